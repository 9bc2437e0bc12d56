"""The project's imaging-protocol knowledge table (written for ehr-worker; not copied from any source).

Clinical scenarios -> the appropriate protocol of ``schemas.catalog.PROTOCOLS``, in the spirit of
the ACR Appropriateness Criteria, plus the patient factors that change the answer:

- ``renal``     impaired renal function (eGFR < 30, dialysis, AKI)    -> avoid iodinated contrast
- ``allergy``   prior severe reaction to iodinated contrast            -> avoid iodinated contrast
- ``pregnant``  pregnancy                                              -> avoid ionising radiation / gadolinium
- ``child``     paediatric patient                                     -> ultrasound first where it answers
- ``pacemaker`` MRI-unsafe implant                                     -> CT instead of MRI

``FLIPS[factor][base protocol] = replacement``; ``BLOCKED[factor]`` lists protocols for which the
factor is not generated at all (the order would be deferred or needs a protocol outside the
catalog). A factor that neither flips nor is blocked may appear as a distractor.

Each phrase list is split between the train and the test pools by position (see
``split_pool``): the held-out test split reads phrasings that training never shows.
Placeholders in braces are filled with random values (``protocol_fillers.FILLERS``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

CTH = "CT head without contrast"
CTH_WWO = "CT head with and without contrast"
CTA_HN = "CTA head and neck"
CT_CS = "CT cervical spine without contrast"
CT_CH_WO = "CT chest without contrast"
CT_CH_W = "CT chest with contrast"
CTA_PE = "CTA chest pulmonary embolism protocol"
CT_AP = "CT abdomen and pelvis with contrast"
CT_STONE = "CT abdomen and pelvis without contrast renal stone protocol"
CT_LIVER = "CT abdomen multiphase liver"
CT_SINUS = "CT sinus and facial bones"
MRB = "MRI brain without contrast"
MRB_WWO = "MRI brain with and without contrast"
MR_CS = "MRI cervical spine"
MR_LS = "MRI lumbar spine"
MR_KNEE = "MRI knee"
MR_SH = "MRI shoulder"
MR_LIVER = "MRI abdomen liver and MRCP"
MR_PELVIS = "MRI pelvis"
US_ABD = "US abdomen complete"
US_RUQ = "US right upper quadrant"
US_PELVIS = "US pelvis"
US_RENAL = "US renal"
US_DVT = "US lower extremity venous duplex"
US_CAROTID = "US carotid duplex"
US_THY = "US thyroid"
US_OB = "US obstetric"
XR_CH = "XR chest two views"
MG_SCREEN = "Mammography screening"
MG_DIAG = "Mammography diagnostic"
NM_BONE = "NM bone scan"
NM_MPI = "NM myocardial perfusion"
PET = "PET/CT skull base to mid-thigh"
ECHO = "Echocardiogram transthoracic"

FACTORS = ("renal", "allergy", "pregnant", "child", "pacemaker")
BLOCK = "BLOCK"

# Relative order volume per protocol (a Zipf-like real-world mix: chest radiographs, head CT and
# abdominal CT dominate; myocardial perfusion and shoulder MRI are rare).
VOLUME: dict[str, float] = {
    XR_CH: 100, CTH: 70, CT_AP: 60, MG_SCREEN: 34, US_RUQ: 30, CT_STONE: 28, US_PELVIS: 25, US_OB: 24,
    CTA_PE: 24, US_DVT: 22, ECHO: 20, CT_CH_WO: 20, CT_CH_W: 17, MR_LS: 17, US_ABD: 16, CT_CS: 16,
    MRB_WWO: 22, MRB: 16, US_RENAL: 14, CTA_HN: 14, US_THY: 10, MR_CS: 10, MG_DIAG: 10, US_CAROTID: 9,
    MR_KNEE: 9, CT_SINUS: 7, CT_LIVER: 6, MR_LIVER: 6, MR_PELVIS: 6, PET: 6, NM_BONE: 5, MR_SH: 4,
    CTH_WWO: 3, NM_MPI: 3,
}

_IODINATED_FALLBACK = {
    CTH_WWO: CTH,
    CTA_HN: MRB,
    CT_CH_W: CT_CH_WO,
    CTA_PE: US_DVT,
    CT_AP: CT_STONE,  # the catalog's non-contrast CT of abdomen and pelvis
    CT_LIVER: MR_LIVER,
}

FLIPS: dict[str, dict[str, str]] = {
    "renal": dict(_IODINATED_FALLBACK),
    "allergy": dict(_IODINATED_FALLBACK),
    "pregnant": {CT_AP: US_ABD, CT_STONE: US_RENAL, MRB_WWO: MRB, US_PELVIS: US_OB},
    "child": {CT_AP: US_ABD, CT_STONE: US_RENAL},
    "pacemaker": {MRB: CTH, MRB_WWO: CTH_WWO, MR_CS: CT_CS},
}

BLOCKED: dict[str, frozenset[str]] = {
    # gadolinium with eGFR < 30 is ambiguous (group II agents are acceptable), and CTA for an acute
    # stroke is not delayed for renal function: leave those combinations out
    "renal": frozenset({MRB_WWO, MR_LIVER, MR_PELVIS, CTA_HN}),
    # an unspecified "contrast allergy" is ambiguous for gadolinium studies and PET/CT: leave out
    "allergy": frozenset({MRB_WWO, MR_LIVER, MR_PELVIS, PET}),
    "pregnant": frozenset({CT_CH_WO, CT_CH_W, CT_SINUS, CTH_WWO, NM_BONE, NM_MPI, PET, MG_SCREEN, MG_DIAG,
                           MR_LIVER, MR_PELVIS, CT_LIVER}),
    "child": frozenset(),
    "pacemaker": frozenset({MR_LS, MR_KNEE, MR_SH, MR_LIVER, MR_PELVIS}),
}

# How often a flip factor is drawn relative to the plain scenario, and as a distractor.
FLIP_WEIGHT = {"renal": 0.10, "allergy": 0.08, "pregnant": 0.14, "child": 0.30, "pacemaker": 0.10}
DISTRACTOR_P = {"renal": 0.05, "allergy": 0.04, "pregnant": 0.05, "pacemaker": 0.03}
# Protocols for which a pregnancy mention is harmless (US, non-contrast MRI, CT head, CTA PE, ...).
PREGNANCY_NEUTRAL = frozenset({XR_CH, CTH, CTA_HN, CT_CS, CTA_PE, MRB, MR_CS, MR_LS, MR_KNEE, MR_SH, US_ABD,
                               US_RUQ, US_RENAL, US_DVT, US_CAROTID, US_THY, US_OB, ECHO})


@dataclass(frozen=True)
class Scenario:
    id: str
    protocol: str  # display name of the base protocol
    weight: float = 1.0  # share among the scenarios of the same protocol
    age: tuple[int, int] = (18, 90)
    sex: str | None = None  # "F" / "M" / None
    sx: tuple[str, ...] = ()  # presenting complaint
    hx: tuple[str, ...] = ()  # relevant history / context that drives the protocol
    find: tuple[str, ...] = ()  # exam and lab findings
    q: tuple[str, ...] = ()  # the clinical question (rendered with "r/o", "eval for", ...)
    neg: tuple[str, ...] = ()  # pertinent negatives
    fixed: tuple[str, ...] = ()  # factors always present (e.g. "pregnant" for obstetric scenarios)
    flips: dict = field(default_factory=dict)  # per-scenario overrides of FLIPS (factor -> protocol/BLOCK)
    key: tuple[str, ...] = ()  # one of these is always rendered (the fact that makes this scenario's answer)
    infant: bool = False  # ages in months/weeks


def S(id, protocol, weight=1.0, **kw) -> Scenario:
    kw = {k: tuple(v) if isinstance(v, list) else v for k, v in kw.items()}
    return Scenario(id, protocol, weight, **kw)


SCENARIOS: tuple[Scenario, ...] = (
    # ------------------------------------------------------------------ XR chest two views
    S("pneumonia", XR_CH, 3.0, age=(1, 95),
      sx=["cough and fever {dur}", "productive cough {dur}", "fever, cough and SOB", "cough with green sputum",
          "worsening cough and chills", "febrile with cough {dur}", "dyspnea and fever", "wet cough, fever to {temp}",
          "cough, pleuritic pain, subjective fevers"],
      find=["crackles at the right base", "decreased breath sounds L base", "SpO2 {o2}% on RA", "temp {temp}",
            "WBC {wbc_hi}", "rhonchi on exam", "egophony RLL", "tachypneic, RR 28", "procalcitonin elevated"],
      q=["pneumonia", "PNA", "community acquired pneumonia", "consolidation", "infiltrate", "lobar pneumonia"],
      neg=["no hemoptysis", "no recent travel", "denies chest pain", "no sick contacts", "no known TB exposure"]),
    S("chf", XR_CH, 1.5, age=(45, 95),
      sx=["SOB", "worsening dyspnea on exertion", "orthopnea and leg swelling", "weight gain 6 lb and SOB",
          "increased oxygen requirement", "PND and bilateral LE edema"],
      hx=["history of heart failure with EF 30%", "known CHF", "ischemic cardiomyopathy", "HFrEF, missed diuretic doses"],
      find=["bibasilar crackles", "JVD", "BNP {bnp}", "2+ pitting edema bilaterally", "S3 gallop"],
      q=["pulmonary edema", "CHF exacerbation", "pleural effusion", "volume overload", "vascular congestion"]),
    S("lines_tubes", XR_CH, 1.2,
      hx=["s/p R IJ central line placement", "NG tube placed at bedside", "post PICC placement", "s/p intubation",
          "s/p chest tube placement", "Dobhoff tube placed", "new L subclavian CVC", "ETT repositioned"],
      q=["line placement", "tube position", "pneumothorax", "ETT position", "catheter tip location"]),
    S("preop", XR_CH, 0.8, age=(40, 90),
      hx=["pre-op clearance for {surgery}", "preoperative evaluation", "pre-op, scheduled for {surgery} next week",
          "pre-anesthesia testing", "surgical clearance"],
      find=["no active complaints", "lungs clear", "asymptomatic"],
      q=["baseline", "cardiopulmonary process prior to surgery", "pre-op baseline"]),
    S("chest_wall_trauma", XR_CH, 0.8,
      sx=["fall with L chest wall pain", "rib pain after fall", "R chest wall pain after slipping on ice",
          "chest wall contusion", "pain with deep breath after fall onto table"],
      find=["point tenderness over ribs 7-9", "ecchymosis L lateral chest", "splinting", "crepitus absent"],
      q=["rib fracture", "pneumothorax", "hemothorax", "rib fx"]),
    S("tb_screen", XR_CH, 0.6,
      hx=["positive PPD", "positive quantiferon", "TB screening for employment", "immigration exam",
          "TB exposure, household contact", "IGRA positive, asymptomatic"],
      q=["active TB", "pulmonary tuberculosis", "latent vs active TB"]),
    S("chest_pain_initial", XR_CH, 1.0, age=(18, 90),
      sx=["chest pain", "CP since this morning", "chest tightness {dur}", "sharp L sided CP", "atypical chest pain"],
      find=["troponin negative", "EKG without acute changes", "vitals stable", "normal sinus rhythm"],
      neg=["D-dimer negative", "no leg swelling", "no hypoxia"],
      q=["pneumothorax", "pneumonia", "widened mediastinum", "acute cardiopulmonary process"]),
    S("peds_wheeze", XR_CH, 0.8, age=(1, 12),
      sx=["wheezing and fever", "cough x2 weeks, febrile", "respiratory distress", "barky cough and stridor",
          "persistent cough after URI"],
      find=["retractions", "focal crackles", "SpO2 {o2}%", "decreased air entry on R"],
      q=["pneumonia", "foreign body", "atelectasis", "airway foreign body"]),
    S("syndromic_recurrent_pna", XR_CH, 0.4, age=(1, 17),
      hx=["recurrent pneumonias", "chronic wet cough since infancy", "frequent chest infections"],
      q=["chronic lung changes", "consolidation", "bronchiectasis"]),

    # ------------------------------------------------------------------ CT head without contrast
    S("head_trauma", CTH, 3.0, age=(2, 98),
      sx=["fall with head strike", "head injury {dur}", "struck head on cabinet", "MVC with head trauma",
          "assaulted, struck in head", "ground level fall, hit head", "fall down stairs, hit occiput",
          "head injury while cycling, no helmet", "syncope with head strike"],
      find=["+LOC", "GCS 14", "scalp hematoma", "vomited twice after injury", "amnestic to event", "confused",
            "occipital laceration", "GCS 15 but persistent headache"],
      hx=["on warfarin, INR {inr}", "on apixaban for afib", "on Eliquis", "on clopidogrel", "on xarelto",
          "elderly on anticoagulation", "dementia at baseline"],
      q=["intracranial hemorrhage", "ICH", "bleed", "SDH", "skull fracture", "acute intracranial injury"],
      neg=["no LOC", "no focal deficits", "no neck pain", "no seizure activity"]),
    S("thunderclap", CTH, 1.0,
      sx=["sudden onset severe headache", "thunderclap headache", "worst headache of life", "acute severe HA during exertion",
          "abrupt onset occipital headache", "sudden severe headache while lifting weights"],
      find=["neck stiffness", "BP {sbp}/95", "photophobia", "vomiting"],
      q=["SAH", "subarachnoid hemorrhage", "intracranial bleed", "hemorrhage"],
      neg=["no trauma", "no fever", "no prior similar headaches"]),
    S("ams", CTH, 1.4, age=(40, 98),
      sx=["altered mental status", "acute confusion", "new confusion {dur}", "found down", "lethargy, not at baseline",
          "unresponsive episode", "acute delirium", "sudden change in mental status"],
      q=["ICH", "acute intracranial process", "mass effect", "hemorrhage", "acute intracranial abnormality"],
      neg=["no known trauma", "no fever", "glucose normal"]),
    S("shunt", CTH, 0.5, age=(1, 60),
      hx=["VP shunt", "hx hydrocephalus s/p VP shunt", "shunted hydrocephalus"],
      sx=["headache and vomiting", "lethargy", "irritability and emesis"],
      q=["shunt malfunction", "hydrocephalus", "ventricular size"]),
    S("ich_followup", CTH, 0.6,
      hx=["known SDH, repeat imaging", "interval f/u of intraparenchymal hemorrhage", "s/p craniotomy POD1",
          "traumatic SAH, 6 h repeat", "s/p burr holes for chronic SDH"],
      q=["interval change in hemorrhage", "stability", "expansion of hematoma"]),

    # ------------------------------------------------------------------ CT head with and without contrast
    S("brain_mass_no_mri", CTH_WWO, 1.0, age=(25, 90), fixed=("pacemaker",),
      hx=["known brain mets", "h/o lung ca with new headaches", "GBM s/p resection", "metastatic melanoma",
          "new headaches and ataxia, h/o breast ca", "SCLC, staging of the brain", "renal cell ca with new confusion",
          "glioma follow-up", "meningioma, interval growth?", "NSCLC with new L arm weakness",
          "known brain tumor, post-radiation", "melanoma with new seizure", "primary CNS lymphoma on treatment"],
      sx=["new focal seizure", "progressive headaches", "new unsteady gait and headache", "personality change {dur}"],
      q=["metastatic disease", "tumor progression", "ring enhancing lesion", "intracranial metastases",
         "enhancing mass", "brain metastasis", "recurrent tumor", "new enhancing lesions", "mass lesion"]),
    S("abscess_no_mri", CTH_WWO, 0.5, age=(20, 85),
      key=["unable to tolerate MRI (severe claustrophobia despite sedation)", "MRI not available overnight",
           "too unstable for MRI", "MRI contraindicated", "cannot have MRI", "MRI not possible (claustrophobia)",
           "MR scanner down", "pt refuses MRI", "no MRI access at this site", "unable to lie flat for MRI"],
      sx=["fever, headache and new seizure", "immunocompromised pt w/ headache and fever", "HIV with headache and fever",
          "post-op craniotomy with fever and wound drainage", "sinusitis with new headache and confusion"],
      q=["brain abscess", "ring enhancing lesion", "intracranial infection", "toxoplasmosis", "empyema",
         "cerebritis", "abscess"]),

    # ------------------------------------------------------------------ CTA head and neck
    S("stroke_code", CTA_HN, 3.0, age=(35, 95),
      sx=["acute R sided weakness", "L facial droop and slurred speech", "aphasia, LKW 1 hr ago",
          "sudden onset L arm weakness", "code stroke", "acute vision loss and ataxia", "R hemiparesis and aphasia",
          "acute onset dysarthria and L sided numbness", "found with facial droop, LKW {lkw} min ago"],
      find=["NIHSS {nihss}", "LKW {lkw} min ago", "gaze deviation to the L", "tPA candidate", "within window"],
      q=["LVO", "large vessel occlusion", "acute ischemic stroke", "thrombectomy candidate", "MCA occlusion"],
      neg=["no head trauma", "glucose normal", "not on anticoagulation"]),
    S("dissection", CTA_HN, 0.7, age=(20, 65),
      sx=["neck pain and headache after chiropractic manipulation", "Horner syndrome with neck pain",
          "unilateral neck pain and pulsatile tinnitus", "headache and neck pain after whiplash"],
      q=["carotid dissection", "vertebral artery dissection", "cervical artery dissection"]),
    S("aneurysm", CTA_HN, 0.6,
      hx=["known intracranial aneurysm f/u", "CN III palsy with pupil involvement", "family hx of intracranial aneurysms",
          "ADPKD, aneurysm screening", "sentinel headache, family hx of aneurysm"],
      q=["intracranial aneurysm", "aneurysm", "vascular malformation"]),
    S("posterior_circ", CTA_HN, 0.5, age=(40, 90),
      sx=["vertigo, diplopia and dysarthria", "acute ataxia and vomiting", "sudden vertigo with nystagmus and dysmetria"],
      q=["posterior circulation stroke", "basilar occlusion", "vertebrobasilar insufficiency"]),
    S("neck_vascular_trauma", CTA_HN, 0.4, age=(16, 70),
      hx=["penetrating neck trauma", "seatbelt sign on neck", "hanging injury", "high energy MVC with C-spine fx"],
      q=["vascular injury", "blunt cerebrovascular injury", "carotid injury"]),
    S("ctd_vascular", CTA_HN, 0.3, age=(5, 50),
      hx=["connective tissue disorder with arterial tortuosity", "suspected vascular Ehlers-Danlos",
          "Loeys-Dietz features, vascular screening"],
      q=["arterial tortuosity", "aneurysm", "dissection"]),

    # ------------------------------------------------------------------ CT cervical spine
    S("neck_trauma", CT_CS, 3.0, age=(16, 95),
      sx=["neck pain after MVC", "fall from ladder with neck pain", "midline neck pain after fall", "diving injury, neck pain",
          "rollover MVC", "neck pain after high speed collision", "fall down 10 stairs, neck pain", "rear-ended, neck pain"],
      find=["midline C-spine tenderness", "paresthesias in both hands", "dangerous mechanism", "intoxicated, exam unreliable",
            "distracting injury", "unable to rotate neck 45 degrees"],
      q=["cervical spine fracture", "C-spine fx", "acute fracture", "malalignment"],
      neg=["no focal neuro deficits", "no LOC"]),

    # ------------------------------------------------------------------ CT chest without contrast
    S("nodule_fu", CT_CH_WO, 2.0, age=(35, 88),
      hx=["{mm} mm RUL nodule on CT {mon}/{yr}", "incidental {mm}mm LLL pulmonary nodule", "f/u solid nodule per Fleischner",
          "ground glass nodule {mm} mm, follow-up", "multiple small pulmonary nodules", "{mm} mm RML nodule, 6 month f/u",
          "part-solid nodule LUL, surveillance", "indeterminate lung nodule"],
      q=["interval change", "nodule stability", "nodule growth", "interval growth"]),
    S("lung_screen", CT_CH_WO, 1.5, age=(50, 80),
      hx=["lung cancer screening", "30 pack-year smoker, quit 5 yrs ago", "current smoker 40 pk-yr, annual screening",
          "low dose CT screening", "LDCT annual", "former smoker, 25 pack-years, screening"],
      neg=["no symptoms", "no hemoptysis", "no weight loss"]),
    S("ild", CT_CH_WO, 1.0, age=(40, 88),
      sx=["progressive dyspnea and dry cough", "exertional dyspnea {dur}", "chronic dry cough and DOE"],
      hx=["scleroderma", "RA on methotrexate", "long term amiodarone", "prior hx of asbestos exposure", "dermatomyositis"],
      find=["fine velcro crackles at bases", "clubbing", "restrictive PFTs", "reduced DLCO"],
      q=["interstitial lung disease", "ILD", "pulmonary fibrosis", "UIP pattern"]),
    S("emphysema_young", CT_CH_WO, 0.4, age=(10, 70),
      hx=["early-onset emphysema", "alpha-1 antitrypsin deficiency", "cutis laxa with progressive dyspnea",
          "connective tissue disorder with dyspnea"],
      sx=["progressive dyspnea", "exertional dyspnea in a nonsmoker"],
      q=["emphysema", "bullous lung disease", "cystic lung disease"]),
    S("bronchiectasis", CT_CH_WO, 0.6, age=(5, 85),
      sx=["chronic productive cough", "recurrent pneumonias", "daily purulent sputum"],
      hx=["cystic fibrosis", "primary ciliary dyskinesia", "immunodeficiency on IVIG"],
      q=["bronchiectasis", "airway disease", "mucus plugging"]),

    # ------------------------------------------------------------------ CT chest with contrast
    S("lung_mass", CT_CH_W, 1.5, age=(35, 90),
      hx=["new lung mass on CXR", "suspicious hilar mass on CXR", "RUL opacity not resolved after abx",
          "widened mediastinum on CXR", "persistent opacity on CXR after treatment"],
      q=["malignancy", "mass characterization", "mediastinal adenopathy", "neoplasm"]),
    S("empyema", CT_CH_W, 0.8,
      sx=["persistent fever despite antibiotics", "pleuritic pain and fever, effusion on CXR"],
      hx=["known pneumonia with effusion", "loculated effusion on US"],
      q=["empyema", "complicated parapneumonic effusion", "lung abscess"]),
    S("hemoptysis", CT_CH_W, 0.6, age=(30, 90),
      sx=["hemoptysis {dur}", "blood streaked sputum", "coughing up blood"],
      hx=["30 pack-year smoker", "weight loss"],
      q=["malignancy", "endobronchial lesion", "source of hemoptysis"]),
    S("lung_ca_restage", CT_CH_W, 1.0, age=(40, 90),
      hx=["NSCLC s/p chemoradiation, restaging", "lung adenocarcinoma on immunotherapy", "SCLC restaging",
          "esophageal cancer restaging", "mesothelioma, response assessment"],
      q=["treatment response", "progression", "recurrence"]),
    S("svc_mediastinal", CT_CH_W, 0.4,
      sx=["facial swelling and distended neck veins", "arm swelling and dyspnea"],
      q=["SVC syndrome", "mediastinal mass", "thymoma"]),

    # ------------------------------------------------------------------ CTA chest PE
    S("pe", CTA_PE, 3.0, age=(18, 92),
      sx=["pleuritic chest pain", "acute SOB", "tachycardia and hypoxia", "sudden onset dyspnea", "CP and SOB",
          "new O2 requirement", "syncope and dyspnea", "acute dyspnea and hemoptysis", "unexplained tachycardia",
          "pleuritic CP with tachypnea"],
      find=["D-dimer {ddimer}", "HR {hr}", "SpO2 {o2}%", "Wells score {wells}", "elevated D-dimer", "positive D-dimer",
            "S1Q3T3 on EKG", "RV strain on bedside echo"],
      hx=["recent long-haul flight", "POD 4 s/p TKA", "on OCPs", "active malignancy", "recent immobilization",
          "prior DVT", "postpartum 2 wks", "recent hip fracture surgery"],
      q=["PE", "pulmonary embolism", "pulmonary embolus", "acute PE", "thromboembolic disease", "saddle embolus"]),

    # ------------------------------------------------------------------ CT abdomen and pelvis with contrast
    S("appendicitis", CT_AP, 3.0, age=(5, 80),
      sx=["RLQ pain {dur}", "periumbilical pain migrating to RLQ", "right lower abdominal pain", "abd pain with anorexia and fever",
          "RLQ pain and vomiting", "right sided abdominal pain since yesterday", "pain in the right lower abdomen",
          "migratory RLQ pain"],
      find=["McBurney point tenderness", "rebound tenderness", "WBC {wbc_hi}", "guarding in RLQ", "Rovsing sign positive",
            "low grade fever", "psoas sign +", "CRP {crp}"],
      q=["appendicitis", "acute appendicitis", "perforated appendicitis", "appy"],
      neg=["no prior appendectomy", "no diarrhea", "no urinary symptoms", "no vaginal discharge"]),
    S("diverticulitis", CT_AP, 1.5, age=(40, 90),
      sx=["LLQ pain {dur}", "left lower abdominal pain with fever", "LLQ tenderness and fever", "LLQ pain, change in bowel habits"],
      hx=["h/o diverticulosis", "prior diverticulitis x2", "diverticulosis on last colonoscopy"],
      find=["WBC {wbc_hi}", "localized LLQ guarding", "temp {temp}"],
      q=["diverticulitis", "abscess", "perforation", "complicated diverticulitis"]),
    S("sbo", CT_AP, 1.2, age=(25, 92),
      sx=["abd distension and vomiting", "obstipation with N/V", "crampy abd pain, no BM x3 days", "bilious emesis and distension"],
      hx=["prior ex-lap", "s/p multiple abdominal surgeries", "prior hernia repair"],
      find=["high pitched bowel sounds", "dilated loops on KUB", "tympanic abdomen"],
      q=["SBO", "small bowel obstruction", "bowel obstruction", "transition point"]),
    S("abd_pain_acute", CT_AP, 1.5, age=(18, 92),
      sx=["diffuse abd pain", "severe abdominal pain", "acute abdomen", "generalized abdominal pain with fever",
          "abd pain and vomiting {dur}", "severe abdominal pain out of proportion to exam"],
      find=["peritoneal signs", "lactate {lactate}", "WBC {wbc_hi}", "diffuse tenderness"],
      q=["intra-abdominal process", "acute abdominal pathology", "perforation", "abscess", "mesenteric ischemia"]),
    S("postop_abscess", CT_AP, 0.8, flips={"pregnant": BLOCK},
      hx=["POD 6 s/p sigmoid colectomy", "s/p appendectomy 1 wk ago, fevers", "post-op fever after Whipple",
          "s/p lap chole 5 days ago, worsening pain"],
      q=["abscess", "anastomotic leak", "fluid collection", "postoperative collection"]),
    S("abd_trauma", CT_AP, 1.0, age=(16, 85), flips={"pregnant": BLOCK},
      sx=["MVC with abdominal pain", "seatbelt sign", "blunt abdominal trauma", "fall from height, abdominal pain",
          "kicked by horse in abdomen"],
      find=["FAST positive", "hypotension resolved with fluids", "LUQ tenderness", "hematuria"],
      q=["solid organ injury", "splenic laceration", "liver laceration", "hemoperitoneum"]),
    S("abd_cancer_staging", CT_AP, 1.0, age=(35, 90), flips={"pregnant": BLOCK},
      hx=["new dx colon cancer, staging", "pancreatic mass on US", "weight loss and early satiety",
          "ovarian cancer restaging", "colon ca s/p resection, surveillance", "lymphoma on chemo, restaging CT"],
      q=["malignancy", "metastatic disease", "staging", "recurrence"]),
    S("pancreatitis", CT_AP, 0.6, flips={"pregnant": BLOCK},
      hx=["acute pancreatitis not improving after 72 h", "lipase {lipase}, worsening pain"],
      q=["necrotizing pancreatitis", "peripancreatic collection", "pancreatic necrosis"]),
    S("complicated_pyelo", CT_AP, 0.5, flips={"pregnant": US_RENAL},
      sx=["flank pain and fever not improving on abx", "fever, rigors and flank pain x3d on antibiotics"],
      q=["renal abscess", "complicated pyelonephritis", "perinephric abscess"]),

    # ------------------------------------------------------------------ CT abdomen and pelvis wo, renal stone protocol
    S("stone", CT_STONE, 3.0, age=(8, 85),
      sx=["L flank pain radiating to groin", "R flank pain {dur}", "colicky flank pain", "flank pain and hematuria",
          "renal colic", "severe intermittent L flank pain", "R flank pain with N/V", "flank pain radiating to testicle",
          "loin to groin pain", "acute unilateral flank pain"],
      find=["hematuria on UA", "microscopic hematuria", "CVA tenderness", "RBC >50 on UA", "writhing in pain"],
      hx=["hx kidney stones", "prior nephrolithiasis", "prior ureteral stone", "recurrent stone former"],
      q=["kidney stone", "nephrolithiasis", "ureterolithiasis", "obstructing stone", "renal calculus", "ureteral stone"],
      neg=["afebrile", "no fever", "no dysuria"]),
    S("stone_fu", CT_STONE, 0.6, flips={"pregnant": BLOCK},
      hx=["known 6 mm L UVJ stone, f/u passage", "s/p lithotripsy", "f/u known ureteral calculus", "stone burden before PCNL"],
      q=["stone passage", "residual stone burden", "interval change in stone"]),

    # ------------------------------------------------------------------ CT abdomen multiphase liver
    S("hcc", CT_LIVER, 2.0, age=(35, 85),
      hx=["cirrhosis 2/2 hep C", "NASH cirrhosis", "alcoholic cirrhosis", "chronic hep B", "cirrhosis, HCC surveillance",
          "cirrhotic liver", "MASH cirrhosis", "HCV cirrhosis, SVR achieved", "hep B carrier", "Child-Pugh A cirrhosis",
          "hemochromatosis with cirrhosis", "cirrhosis on transplant list"],
      find=["AFP {afp}", "rising AFP", "new 2 cm liver lesion on US", "LI-RADS 4 observation on US", "new hepatic nodule on US",
            "AFP trending up", "1.8 cm hypoechoic liver nodule on surveillance US", "nodular liver with new focal lesion",
            "US surveillance positive"],
      q=["HCC", "hepatocellular carcinoma", "liver lesion characterization", "arterially enhancing lesion",
         "LI-RADS", "washout", "hepatoma", "liver cancer", "triple phase liver"]),
    S("liver_lesion", CT_LIVER, 1.0,
      hx=["indeterminate liver lesion on prior US", "incidental hepatic hypodensity on CT", "new liver mass on US",
          "too small to characterize liver lesion on prior CT", "colon ca, new liver lesion", "hepatic mass on outside CT",
          "incidental liver lesion", "enlarging hepatic lesion"],
      q=["hemangioma vs metastasis", "FNH vs adenoma", "liver mass characterization", "hepatic lesion",
         "characterize liver lesion", "liver metastases", "hepatic mass", "multiphase characterization"]),
    S("post_tace", CT_LIVER, 0.6,
      hx=["s/p TACE, post-treatment eval", "liver transplant evaluation", "s/p ablation of HCC", "s/p Y-90 radioembolization",
          "s/p microwave ablation of liver lesion", "pre-transplant liver protocol", "post RFA follow-up"],
      q=["residual viable tumor", "treatment response", "recurrence", "LR-TR viable", "local recurrence",
         "vascular anatomy for transplant"]),

    # ------------------------------------------------------------------ CT sinus and facial bones
    S("sinusitis", CT_SINUS, 1.0, age=(15, 85),
      sx=["chronic sinus congestion > 12 wks", "recurrent sinusitis", "facial pressure and nasal obstruction",
          "chronic rhinosinusitis symptoms", "purulent nasal drainage for months"],
      hx=["failed 3 courses of abx", "ENT pre-op planning for FESS", "nasal polyps"],
      q=["chronic sinusitis", "sinus disease", "sinonasal polyposis"]),
    S("facial_trauma", CT_SINUS, 1.2, age=(10, 90),
      sx=["facial trauma after assault", "punched in face", "fall on face with periorbital swelling",
          "nasal deformity after injury", "hit in face with baseball"],
      find=["step-off at orbital rim", "diplopia on upward gaze", "malocclusion", "epistaxis", "cheek numbness"],
      q=["facial fracture", "orbital floor fx", "nasal bone fx", "zygomatic fracture", "maxillary fracture"]),

    # ------------------------------------------------------------------ MRI brain without contrast
    S("dementia", MRB, 1.2, age=(55, 95),
      sx=["progressive memory loss", "cognitive decline {dur}", "short term memory problems", "word finding difficulty",
          "gait apraxia, urinary incontinence and confusion", "forgetfulness getting worse", "behavior change and memory loss"],
      find=["MoCA {moca}/30", "MMSE 22", "B12 and TSH normal"],
      q=["neurodegenerative process", "NPH", "vascular dementia", "atrophy pattern", "Alzheimer disease"]),
    S("peds_neuro", MRB, 1.5, age=(0, 17),
      sx=["global developmental delay", "seizures and developmental delay", "hypotonia and delayed milestones",
          "regression of milestones", "ataxia", "new onset seizures", "macrocephaly", "microcephaly and delay",
          "staring spells", "infantile spasms"],
      hx=["abnormal EEG", "born at 28 wks", "dysmorphic features", "genetic workup in progress"],
      q=["structural brain abnormality", "malformation of cortical development", "leukodystrophy", "white matter disease",
         "epileptogenic lesion", "brain malformation", "structural cause", "hypoxic ischemic injury"]),
    S("tia_dwi", MRB, 1.0, age=(45, 90),
      sx=["transient aphasia, resolved", "TIA symptoms resolved", "transient L arm numbness", "episode of word finding difficulty"],
      hx=["TIA", "prior CT head negative"],
      q=["acute infarct", "small vessel ischemic disease", "infarct"]),
    S("chronic_headache", MRB, 0.8, age=(12, 70),
      sx=["chronic headaches", "new daily persistent headache", "headaches worse in morning", "occipital headaches with cough"],
      neg=["no focal deficits", "normal neuro exam"],
      q=["structural lesion", "Chiari malformation", "intracranial pathology"]),

    # ------------------------------------------------------------------ MRI brain with and without contrast
    S("brain_mets", MRB_WWO, 1.5, age=(30, 90),
      hx=["h/o lung ca", "metastatic melanoma", "breast ca with new headache", "NSCLC staging", "SCLC, PCI planning",
          "renal cell ca, new headache"],
      q=["brain metastases", "metastatic disease", "intracranial metastases"]),
    S("brain_tumor_fu", MRB_WWO, 1.2, age=(5, 90),
      hx=["GBM s/p resection and chemoradiation", "meningioma f/u", "low grade glioma surveillance", "known brain mass",
          "s/p resection of pituitary adenoma", "NF1, optic glioma surveillance", "tuberous sclerosis, SEGA surveillance"],
      q=["tumor recurrence", "progression", "interval change", "residual tumor"]),
    S("ms", MRB_WWO, 1.2, age=(18, 60),
      hx=["MS on ocrelizumab", "known MS, annual f/u", "optic neuritis episode", "relapsing remitting MS"],
      sx=["new numbness and visual loss", "new leg weakness in MS pt", "painful monocular vision loss"],
      q=["demyelinating disease", "active demyelination", "new enhancing lesions", "MS"]),
    S("vascular_malformation_screen", MRB_WWO, 0.4, age=(2, 70),
      hx=["HHT, screening for cerebral AVMs", "recurrent epistaxis and telangiectasias, family hx HHT",
          "tumor predisposition syndrome, surveillance", "known cavernous malformations, f/u",
          "von Hippel-Lindau surveillance"],
      q=["cerebral AVM", "vascular malformation", "hemangioblastoma", "intracranial lesion"]),
    S("cns_infection", MRB_WWO, 0.6,
      sx=["fever, headache and new seizure", "HIV with headache and confusion", "fever and focal weakness"],
      q=["brain abscess", "encephalitis", "toxoplasmosis", "meningitis complications"]),
    S("pituitary", MRB_WWO, 0.6, age=(18, 70), flips={"pregnant": BLOCK},
      sx=["galactorrhea and amenorrhea", "bitemporal hemianopia", "headache and visual field cut"],
      find=["prolactin {prl}", "elevated IGF-1", "low cortisol"],
      q=["pituitary adenoma", "pituitary microadenoma", "sellar mass"]),
    S("adult_seizure", MRB_WWO, 0.8, age=(25, 85),
      sx=["new onset seizure", "first unprovoked seizure", "first generalized seizure"],
      q=["mass", "structural lesion", "tumor", "underlying lesion"]),
    # ACR Appropriateness Criteria: visual loss, cranial neuropathy, headache with red flags (cancer,
    # immunosuppression, papilledema, new headache after 50) -> MRI head without and with contrast
    S("visual_loss", MRB_WWO, 0.7, age=(16, 80),
      sx=["painful vision loss L eye", "acute monocular vision loss", "blurry vision and pain with eye movement",
          "new visual field defect", "double vision {dur}", "sudden vision loss R eye", "diplopia and ptosis"],
      find=["RAPD", "optic disc swelling", "papilledema on fundoscopy", "CN VI palsy", "red desaturation"],
      q=["optic neuritis", "demyelination", "compressive lesion", "orbital/optic nerve pathology", "mass lesion"]),
    S("cranial_neuropathy", MRB_WWO, 0.5, age=(25, 85),
      sx=["trigeminal neuralgia", "R facial numbness", "new facial droop, not improving after 3 months", "hoarseness and tongue deviation",
          "facial pain and numbness", "progressive facial weakness"],
      q=["trigeminal nerve lesion", "skull base mass", "perineural spread", "neurovascular compression"]),
    S("headache_redflag", MRB_WWO, 0.9, age=(18, 90),
      sx=["new headache", "worsening headaches {dur}", "headache with nausea and blurry vision", "progressive headache, worse lying down",
          "new headaches age > 50", "headache and confusion"],
      hx=["h/o breast cancer", "HIV, CD4 90", "on immunosuppression after transplant", "known malignancy", "lung ca",
          "papilledema on exam", "melanoma s/p resection"],
      q=["metastasis", "mass", "leptomeningeal disease", "infection", "space occupying lesion"]),
    S("seizure_workup", MRB_WWO, 0.9, age=(16, 85),
      sx=["seizure", "new onset seizure", "breakthrough seizures", "witnessed GTC seizure", "focal seizure with R arm jerking",
          "episode of LOC with tongue biting"],
      hx=["EEG with focal slowing", "no prior seizure history", "first seizure, no provoking factors"],
      q=["seizure focus", "epileptogenic lesion", "tumor", "structural abnormality"]),
    S("subacute_stroke", MRB, 1.0, age=(40, 95),
      sx=["L sided weakness {dur}", "slurred speech since yesterday", "R arm weakness, onset 3 days ago", "new aphasia, outside window",
          "gait unsteadiness and vertigo {dur}", "facial droop and dysarthria, LKW > 24h"],
      hx=["CT head negative for bleed", "stroke admission", "afib not on anticoagulation"],
      q=["acute infarct", "stroke", "ischemia", "posterior circulation infarct", "CVA"]),
    S("acoustic", MRB_WWO, 0.5, age=(25, 80),
      sx=["asymmetric sensorineural hearing loss", "unilateral tinnitus and hearing loss", "unilateral SNHL on audiogram"],
      q=["vestibular schwannoma", "CP angle mass", "acoustic neuroma"]),

    # ------------------------------------------------------------------ MRI cervical spine
    S("c_radic", MR_CS, 2.0, age=(25, 80),
      sx=["neck pain radiating to R arm", "L arm numbness and tingling {dur}", "cervical radiculopathy",
          "C6 radiculopathy symptoms", "neck pain with radiation down L arm to thumb", "R arm paresthesias in C7 distribution",
          "radiating arm pain from the neck", "numbness of the thumb and index finger with neck pain"],
      find=["weak biceps", "decreased triceps reflex", "positive Spurling", "grip weakness"],
      hx=["failed 6 wks PT", "failed conservative tx", "prior ACDF C5-6"],
      q=["disc herniation", "foraminal stenosis", "nerve root compression", "cervical radiculopathy"]),
    S("myelopathy", MR_CS, 1.0, age=(35, 85),
      sx=["hand clumsiness and gait instability", "bilateral hand numbness", "difficulty buttoning shirts, falls"],
      find=["hyperreflexia", "positive Hoffmann sign", "clonus", "broad based gait"],
      q=["cervical myelopathy", "cord compression", "spinal canal stenosis"]),
    S("c_trauma_deficit", MR_CS, 0.5, age=(16, 85),
      hx=["CT C-spine negative but persistent neuro deficit", "obtunded trauma patient, CT negative"],
      q=["ligamentous injury", "cord contusion", "epidural hematoma"]),

    # ------------------------------------------------------------------ MRI lumbar spine
    S("l_radic", MR_LS, 2.5, age=(20, 85),
      sx=["LBP radiating down L leg", "sciatica {dur}", "low back pain with R leg numbness", "L5 radiculopathy",
          "back pain radiating to R foot", "shooting pain down the back of the leg"],
      hx=["failed 6 wks conservative mgmt", "failed PT and NSAIDs", "surgical planning", "s/p L4-5 laminectomy"],
      find=["positive SLR", "EHL weakness", "decreased ankle jerk", "foot drop"],
      q=["disc herniation", "HNP", "spinal stenosis", "nerve impingement", "nerve root compression"]),
    S("cauda", MR_LS, 0.6, age=(20, 85),
      sx=["saddle anesthesia and urinary retention", "bilateral leg weakness and incontinence", "new bowel incontinence with back pain"],
      q=["cauda equina syndrome", "cord compression", "conus compression"]),
    S("back_redflag", MR_LS, 0.8, age=(25, 90),
      hx=["h/o prostate ca, new back pain", "IVDU with back pain and fever", "back pain, fever, elevated ESR",
          "breast ca with new back pain"],
      q=["epidural abscess", "discitis osteomyelitis", "metastatic disease", "cord compression"]),
    S("stenosis", MR_LS, 0.8, age=(55, 90),
      sx=["neurogenic claudication", "bilateral leg pain with walking relieved by sitting", "leg heaviness when standing"],
      q=["lumbar spinal stenosis", "central canal stenosis"]),
    S("tethered", MR_LS, 0.3, age=(0, 10),
      hx=["sacral dimple with hair tuft", "lumbosacral hemangioma", "toe walking and urinary incontinence"],
      q=["tethered cord", "occult spinal dysraphism", "low lying conus"]),

    # ------------------------------------------------------------------ MRI knee
    S("knee_injury", MR_KNEE, 2.0, age=(14, 70),
      sx=["knee injury playing soccer", "twisting injury R knee", "knee locking and clicking", "L knee pain and effusion after pivot",
          "knee gives way", "heard a pop in the knee while skiing", "medial knee pain after squatting"],
      find=["positive Lachman", "positive McMurray", "joint line tenderness", "effusion", "laxity on valgus stress"],
      hx=["XR negative", "negative radiographs", "failed PT"],
      q=["ACL tear", "meniscal tear", "internal derangement", "MCL injury", "osteochondral lesion"]),
    S("knee_chronic", MR_KNEE, 0.6, age=(30, 75),
      sx=["chronic medial knee pain", "knee pain with mechanical symptoms", "persistent knee pain despite injection"],
      q=["meniscal tear", "osteonecrosis", "bone marrow edema", "chondral defect"]),

    # ------------------------------------------------------------------ MRI shoulder
    S("shoulder", MR_SH, 2.0, age=(18, 80),
      sx=["shoulder pain with overhead activity", "R shoulder pain after fall on outstretched arm", "weakness abducting arm",
          "recurrent shoulder dislocation", "night pain in shoulder", "L shoulder pain and weakness {dur}"],
      find=["positive drop arm test", "positive empty can test", "painful arc", "apprehension sign positive"],
      hx=["failed PT", "XR negative", "s/p subacromial injection without relief"],
      q=["rotator cuff tear", "RTC tear", "labral tear", "SLAP tear", "full thickness supraspinatus tear"]),

    # ------------------------------------------------------------------ MRI abdomen liver and MRCP
    S("choledocho", MR_LIVER, 1.5, age=(25, 90),
      sx=["RUQ pain with jaundice", "jaundice and elevated LFTs", "painless jaundice", "scleral icterus and dark urine",
          "epigastric pain, cholestatic LFTs", "pruritus and jaundice"],
      find=["T bili {bili}", "dilated CBD on US", "alk phos {alp}", "CBD 9 mm on ultrasound", "intrahepatic ductal dilation on US",
            "GGT and ALP elevated", "lipase normal, bili up"],
      hx=["s/p cholecystectomy", "US showed biliary dilation", "gallstone pancreatitis, resolving", "post-chole with recurrent pain"],
      q=["choledocholithiasis", "CBD stone", "biliary obstruction", "biliary stricture", "MRCP", "retained CBD stone",
         "common duct stone", "cause of biliary dilation"]),
    S("psc", MR_LIVER, 0.6, age=(18, 70),
      hx=["ulcerative colitis with cholestatic LFTs", "known PSC, surveillance", "elevated alk phos, IBD",
          "Crohn's with rising ALP", "PSC, annual imaging", "cholestatic liver enzymes of unclear cause"],
      q=["PSC", "primary sclerosing cholangitis", "biliary strictures", "cholangiocarcinoma", "beading of the ducts",
         "dominant stricture"]),
    S("pancreatic_cyst", MR_LIVER, 0.8, age=(40, 90),
      hx=["pancreatic cyst f/u", "IPMN surveillance", "incidental pancreatic cystic lesion", "2 cm pancreatic tail cyst on CT",
          "branch duct IPMN, yearly f/u", "pancreatic cystic lesion, MD requests MRCP"],
      q=["IPMN", "cyst growth", "worrisome features", "main duct involvement", "cyst characterization"]),
    S("iron_liver", MR_LIVER, 0.3,
      hx=["hemochromatosis", "transfusion dependent thalassemia", "elevated ferritin"],
      q=["hepatic iron overload", "liver iron quantification"]),

    # ------------------------------------------------------------------ MRI pelvis
    S("rectal_staging", MR_PELVIS, 1.0, age=(35, 90),
      hx=["biopsy-proven rectal adenocarcinoma", "rectal mass on colonoscopy", "rectal cancer after neoadjuvant therapy"],
      q=["local staging", "T staging", "CRM involvement", "response to neoadjuvant therapy"]),
    S("prostate", MR_PELVIS, 1.2, age=(45, 85), sex="M",
      hx=["PSA {psa}", "rising PSA", "elevated PSA, prior negative biopsy", "active surveillance for prostate ca",
          "PSA {psa}, abnormal DRE"],
      q=["prostate cancer", "PI-RADS assessment", "clinically significant prostate cancer"]),
    S("gyn_mri", MR_PELVIS, 0.8, age=(20, 75), sex="F",
      hx=["fibroids, pre-UAE planning", "indeterminate adnexal mass on US", "endometrial ca staging", "cervical ca staging",
          "suspected adenomyosis"],
      q=["fibroid mapping", "adnexal mass characterization", "adenomyosis", "local staging"]),
    S("perianal", MR_PELVIS, 0.5, age=(15, 70),
      hx=["Crohn's with perianal drainage", "recurrent perianal abscess"],
      q=["perianal fistula", "fistula in ano", "abscess"]),
    S("appy_pregnant_us_nondx", MR_PELVIS, 0.4, age=(18, 42), sex="F", fixed=("pregnant",),
      sx=["RLQ pain", "right sided abdominal pain {dur}"],
      key=["US nondiagnostic, appendix not visualized", "appendix not seen on ultrasound", "inconclusive US for appendicitis"],
      q=["appendicitis"]),

    # ------------------------------------------------------------------ US abdomen complete
    S("organomegaly", US_ABD, 1.0, age=(1, 85),
      hx=["suspected storage disorder", "metabolic disease workup", "cholestatic jaundice in infancy"],
      find=["palpable spleen tip", "hepatomegaly on exam", "hepatosplenomegaly", "splenomegaly on exam",
            "elevated liver enzymes"],
      q=["splenomegaly", "organomegaly", "hepatosplenomegaly", "liver size"]),
    S("abnormal_lfts", US_ABD, 1.2,
      find=["elevated LFTs", "abnormal liver enzymes", "ALT {alt}", "elevated transaminases"],
      hx=["obesity", "alcohol use", "on statin"],
      q=["fatty liver", "hepatic steatosis", "liver parenchymal disease", "chronic liver disease"]),
    S("ascites", US_ABD, 0.6,
      sx=["abdominal distension", "increasing abdominal girth", "abdominal swelling"],
      hx=["cirrhosis", "CHF"],
      q=["ascites", "paracentesis target", "free fluid"]),
    S("intussusception", US_ABD, 0.6, age=(0, 4), infant=True,
      sx=["intermittent colicky abd pain with currant jelly stool", "episodic inconsolable crying drawing up legs",
          "lethargy and bloody stools"],
      q=["intussusception"]),
    S("pyloric", US_ABD, 0.4, age=(0, 0), infant=True,
      sx=["projectile non-bilious vomiting", "vomiting after every feed, hungry after"],
      find=["olive palpated", "hypochloremic alkalosis"],
      q=["pyloric stenosis", "HPS"]),
    S("aaa", US_ABD, 0.5, age=(65, 80), sex="M",
      hx=["AAA screening, ex-smoker", "pulsatile abdominal mass", "family hx AAA"],
      q=["AAA", "abdominal aortic aneurysm"]),
    S("epigastric_general", US_ABD, 0.8,
      sx=["epigastric pain", "vague abdominal pain {dur}", "abdominal pain, nausea"],
      q=["abdominal pathology", "gallstones vs liver disease"]),

    # ------------------------------------------------------------------ US right upper quadrant
    S("biliary", US_RUQ, 3.0, age=(16, 90),
      sx=["RUQ pain after fatty meals", "RUQ pain {dur}", "epigastric/RUQ pain with N/V", "postprandial RUQ pain",
          "RUQ pain radiating to R shoulder", "intermittent RUQ pain", "right upper abdominal pain",
          "pain under the right ribs after eating"],
      find=["positive Murphy sign", "WBC {wbc_hi}", "fever", "mildly elevated LFTs", "RUQ tenderness"],
      q=["cholecystitis", "cholelithiasis", "gallstones", "gallbladder disease", "biliary colic", "acute cholecystitis"],
      neg=["no jaundice", "no prior cholecystectomy"]),
    S("jaundice_first", US_RUQ, 0.8,
      sx=["new jaundice", "scleral icterus"],
      find=["T bili {bili}", "elevated alk phos"],
      q=["biliary dilation", "obstruction", "biliary ductal dilatation"]),

    # ------------------------------------------------------------------ US pelvis
    S("pelvic_pain", US_PELVIS, 2.0, age=(14, 75), sex="F",
      sx=["pelvic pain {dur}", "L adnexal pain", "acute R pelvic pain", "lower abdominal pain, female", "sudden onset L pelvic pain"],
      neg=["hCG negative", "UPT neg"],
      q=["ovarian cyst", "ovarian torsion", "adnexal mass", "hemorrhagic cyst", "torsion"]),
    S("aub", US_PELVIS, 1.5, age=(25, 85), sex="F", flips={"pregnant": BLOCK},
      sx=["abnormal uterine bleeding", "menorrhagia", "postmenopausal bleeding", "heavy irregular menses"],
      q=["fibroids", "endometrial thickening", "endometrial polyp", "uterine pathology"]),
    S("iud", US_PELVIS, 0.4, age=(18, 48), sex="F", flips={"pregnant": BLOCK},
      hx=["IUD strings not visualized", "IUD placed 6 wks ago, pain"], q=["IUD position", "malpositioned IUD"]),
    S("pcos", US_PELVIS, 0.4, age=(15, 40), sex="F", flips={"pregnant": BLOCK},
      sx=["irregular menses and hirsutism", "oligomenorrhea"],
      q=["PCOS", "polycystic ovaries"]),
    S("primary_amenorrhea", US_PELVIS, 0.3, age=(13, 18), sex="F", flips={"pregnant": BLOCK},
      sx=["primary amenorrhea"], q=["presence of uterus and ovaries", "Mullerian anomaly"]),

    # ------------------------------------------------------------------ US renal
    S("aki", US_RENAL, 1.5,
      find=["Cr {cr_hi} (baseline 0.9)", "AKI", "rising creatinine", "acute kidney injury, Cr {cr_hi}"],
      q=["hydronephrosis", "obstruction", "renal size", "obstructive uropathy"]),
    S("ckd_eval", US_RENAL, 0.8,
      hx=["CKD stage 3, new to nephrology", "proteinuria", "hematuria workup"],
      q=["renal parenchymal disease", "renal size and echogenicity", "structural abnormality"]),
    S("peds_uti", US_RENAL, 0.8, age=(0, 6), infant=True,
      hx=["febrile UTI", "first febrile UTI", "recurrent UTIs"],
      q=["hydronephrosis", "renal anomaly", "renal scarring"]),
    S("transplant", US_RENAL, 0.5,
      hx=["renal transplant with rising Cr", "kidney transplant, decreased urine output"],
      q=["transplant dysfunction", "renal artery stenosis", "hydronephrosis of transplant"]),
    S("renal_cysts", US_RENAL, 0.6, age=(0, 70),
      hx=["family hx polycystic kidney disease", "known hydronephrosis, f/u", "prenatal hydronephrosis f/u",
          "syndromic features, renal anomaly screening", "renal Fanconi syndrome", "polyuria and failure to thrive",
          "tubulopathy with hypercalciuria"],
      q=["ADPKD", "renal cysts", "renal anomaly", "hydronephrosis", "nephrocalcinosis", "renal size and echogenicity"]),

    # ------------------------------------------------------------------ US lower extremity venous duplex
    S("dvt", US_DVT, 3.0,
      sx=["L calf pain and swelling", "unilateral leg swelling {dur}", "R LE edema and erythema", "leg pain after long flight",
          "swollen painful left leg", "R thigh swelling", "asymmetric calf swelling", "painful swollen calf"],
      find=["calf tenderness", "positive Homan sign", "D-dimer {ddimer}", "calf circumference 3 cm > contralateral", "pitting edema L leg"],
      hx=["recent surgery", "on OCPs", "active cancer", "immobilization", "prior DVT"],
      q=["DVT", "deep vein thrombosis", "venous thrombosis", "thrombus"]),

    # ------------------------------------------------------------------ US carotid duplex
    S("carotid", US_CAROTID, 2.0, age=(45, 92),
      sx=["transient R arm weakness, resolved", "amaurosis fugax", "TIA symptoms", "episode of transient monocular blindness"],
      find=["L carotid bruit", "carotid bruit on exam", "bilateral carotid bruits"],
      hx=["known carotid stenosis, f/u", "pre-CABG screening", "s/p CEA"],
      q=["carotid stenosis", "ICA stenosis", "carotid plaque", "carotid artery disease"]),

    # ------------------------------------------------------------------ US thyroid
    S("thyroid_nodule", US_THY, 2.0, age=(15, 88),
      sx=["palpable neck mass", "thyroid nodule on exam", "neck lump", "anterior neck swelling"],
      hx=["incidental thyroid nodule on CT", "f/u 1.5 cm thyroid nodule", "goiter", "prior FNA benign, f/u"],
      find=["TSH normal", "firm nodule R lobe", "euthyroid"],
      q=["thyroid nodule", "TI-RADS", "goiter", "thyroid mass"]),
    S("hyperthyroid", US_THY, 0.5,
      hx=["hyperthyroidism", "new hypothyroidism with goiter"], find=["TSH <0.01", "elevated free T4"],
      q=["Graves disease", "thyroiditis", "toxic nodule"]),

    # ------------------------------------------------------------------ US obstetric
    S("ob_dating", US_OB, 1.0, age=(18, 42), sex="F", fixed=("pregnant",),
      hx=["unsure LMP", "dating ultrasound", "LMP uncertain, + hCG", "first prenatal visit"],
      q=["gestational age", "viability", "IUP", "dating"]),
    S("ob_bleeding", US_OB, 1.0, age=(18, 42), sex="F", fixed=("pregnant",),
      sx=["vaginal bleeding", "spotting in first trimester", "cramping and bleeding"],
      q=["threatened abortion", "viability", "subchorionic hemorrhage", "fetal heart rate"]),
    S("ob_ectopic", US_OB, 0.8, age=(18, 42), sex="F", fixed=("pregnant",),
      sx=["pelvic pain with positive hCG", "L pelvic pain, beta hCG {hcg}", "+UPT with lower abd pain"],
      q=["ectopic pregnancy", "IUP", "ectopic"]),
    S("ob_growth", US_OB, 0.8, age=(18, 42), sex="F", fixed=("pregnant",),
      hx=["anatomy scan", "size less than dates", "growth scan, GDM", "twin pregnancy f/u", "decreased fetal movement"],
      q=["fetal growth", "fetal anatomy", "IUGR", "amniotic fluid"]),

    # ------------------------------------------------------------------ Mammography
    S("screening", MG_SCREEN, 3.0, age=(40, 79), sex="F",
      hx=["annual screening", "routine screening mammogram", "screening", "family hx breast ca in mother",
          "last mammogram 1 yr ago", "due for screening"],
      neg=["no palpable lumps", "no breast symptoms", "no breast complaints"]),
    S("breast_lump", MG_DIAG, 2.0, age=(30, 90), sex="F",
      sx=["palpable lump L breast", "R breast mass at 10:00", "new breast lump", "breast mass felt on self exam",
          "bloody nipple discharge", "skin thickening of R breast"],
      find=["skin dimpling", "nipple retraction", "axillary node palpable", "2 cm firm mobile mass"],
      q=["breast mass", "malignancy", "breast cancer"]),
    S("callback", MG_DIAG, 1.0, age=(40, 80), sex="F",
      hx=["callback from screening for asymmetry", "BI-RADS 0 on screening", "short interval f/u BI-RADS 3",
          "recall for calcifications", "s/p lumpectomy, surveillance"],
      q=["asymmetry", "calcifications", "architectural distortion"]),
    S("gynecomastia", MG_DIAG, 0.2, age=(20, 85), sex="M",
      sx=["L breast enlargement", "tender subareolar lump"], q=["gynecomastia", "male breast cancer"]),

    # ------------------------------------------------------------------ NM bone scan
    S("bone_mets", NM_BONE, 2.5, age=(45, 90),
      hx=["prostate ca, PSA rising {psa}", "breast ca, staging for osseous disease", "new dx prostate ca Gleason 8",
          "high risk prostate ca, staging", "lung ca with multifocal rib pain", "biochemical recurrence of prostate ca",
          "breast ca with rising alk phos"],
      sx=["diffuse bone pain", "multifocal bone pain", "bone pain in several sites"],
      find=["elevated alk phos", "rising tumor markers"],
      q=["osseous metastases", "bone mets", "metastatic disease to bone", "skeletal metastases"]),
    S("occult_fx", NM_BONE, 0.5, age=(15, 70),
      hx=["runner with shin pain, XR neg", "stress fracture suspected", "polyostotic bone lesions, extent"],
      q=["stress fracture", "occult fracture", "extent of skeletal involvement"]),

    # ------------------------------------------------------------------ NM myocardial perfusion
    S("mpi", NM_MPI, 2.0, age=(40, 90),
      sx=["exertional chest pain", "chest pressure with exertion", "anginal symptoms", "DOE and chest tightness"],
      hx=["unable to exercise, pharmacologic stress", "LBBB on EKG", "pre-op risk stratification", "known CAD s/p PCI"],
      find=["troponins negative x2", "EKG uninterpretable for ischemia"],
      q=["ischemia", "CAD", "inducible ischemia", "myocardial perfusion defect"]),

    # ------------------------------------------------------------------ PET/CT
    S("lymphoma", PET, 2.0, age=(12, 85),
      hx=["new dx DLBCL", "Hodgkin lymphoma, interim", "lymphoma staging", "end of treatment lymphoma",
          "follicular lymphoma, suspected transformation"],
      q=["staging", "response assessment", "Deauville score", "disease extent"]),
    S("solid_tumor_pet", PET, 1.5, age=(30, 90),
      hx=["biopsy-proven NSCLC, staging", "solitary pulmonary nodule 1.5 cm, indeterminate", "melanoma stage III",
          "head and neck SCC staging", "esophageal ca staging", "cancer of unknown primary"],
      q=["staging", "FDG avidity", "distant metastases", "occult primary"]),

    # ------------------------------------------------------------------ Echocardiogram
    S("murmur", ECHO, 1.5, age=(0, 95),
      find=["new systolic murmur", "holosystolic murmur at apex", "harsh systolic murmur at RUSB"],
      q=["valvular disease", "aortic stenosis", "mitral regurgitation", "structural heart disease"]),
    S("hf_echo", ECHO, 1.5, age=(30, 95),
      sx=["SOB and LE edema", "new dyspnea and orthopnea"], find=["BNP {bnp}"], hx=["new heart failure"],
      q=["LV function", "ejection fraction", "cardiomyopathy", "LVEF"]),
    S("syncope_echo", ECHO, 0.8, age=(10, 90),
      sx=["exertional syncope", "syncope with exertion"], q=["HOCM", "aortic stenosis", "structural heart disease"]),
    S("afib_echo", ECHO, 0.8, age=(40, 95),
      hx=["new onset afib", "afib with RVR"], q=["LA size", "LV function", "valvular disease"]),
    S("endocarditis", ECHO, 0.6,
      hx=["staph aureus bacteremia", "IVDU with fever", "fever and new murmur"],
      q=["endocarditis", "vegetation", "valvular vegetation"]),
    S("cardio_onc", ECHO, 0.6, age=(18, 85),
      hx=["pre-anthracycline baseline", "on trastuzumab, LVEF monitoring"], q=["LVEF", "cardiotoxicity", "baseline LV function"]),
    S("stroke_source", ECHO, 0.5, age=(30, 90),
      hx=["embolic stroke", "cryptogenic stroke"], q=["cardiac source of embolus", "PFO", "LV thrombus"]),
    S("syndromic_heart", ECHO, 0.5, age=(0, 40),
      hx=["dysmorphic features, congenital heart disease screening", "marfanoid habitus", "suspected genetic syndrome"],
      q=["congenital heart disease", "aortic root dilation", "structural heart disease"]),
)

# Order names a clinician might pick for each protocol (code.text); generic on purpose.
ORDER_NAMES: dict[str, tuple[str, ...]] = {
    CTH: ("CT head", "CT head wo", "CT brain", "CT HEAD W/O CONTRAST", "Head CT", "NCCT head", "CT head noncon"),
    CTH_WWO: ("CT head", "CT head w/wo", "CT brain with and without", "CT head w and wo contrast"),
    CTA_HN: ("CTA head and neck", "CT angio head/neck", "CT head", "CTA H&N", "Code stroke imaging", "CTA neck"),
    CT_CS: ("CT C-spine", "CT cervical spine", "CT neck spine", "CT C spine wo", "CT spine cervical"),
    CT_CH_WO: ("CT chest", "CT chest wo", "LDCT chest", "HRCT chest", "CT thorax"),
    CT_CH_W: ("CT chest", "CT chest w contrast", "CT thorax with IV contrast", "CT chest w"),
    CTA_PE: ("CTA chest", "CT chest PE", "CTPA", "CT angio chest", "CT chest"),
    CT_AP: ("CT abdomen", "CT A/P", "CT abd/pelvis", "CT abdomen pelvis w contrast", "CTAP", "CT abd pel w IV"),
    CT_STONE: ("CT abdomen", "CT A/P", "CT KUB", "CT stone protocol", "CT renal stone", "CT abd/pelvis wo"),
    CT_LIVER: ("CT abdomen", "CT liver", "CT abdomen triphasic", "CT liver 3 phase", "CT abd w"),
    CT_SINUS: ("CT sinus", "CT face", "CT maxillofacial", "CT facial bones", "CT sinuses wo"),
    MRB: ("MRI brain", "MR brain", "MRI head", "MRI brain wo", "MR brain noncon"),
    MRB_WWO: ("MRI brain", "MR brain w/wo", "MRI brain with and without", "MRI head w wo", "MR brain"),
    MR_CS: ("MRI C-spine", "MR cervical spine", "MRI neck spine", "MRI c spine wo", "MR C spine"),
    MR_LS: ("MRI L-spine", "MR lumbar spine", "MRI lumbar", "MRI LS spine", "MRI back"),
    MR_KNEE: ("MRI knee", "MR knee", "MRI R knee", "MRI L knee", "MRI knee wo"),
    MR_SH: ("MRI shoulder", "MR shoulder", "MRI R shoulder", "MRI L shoulder"),
    MR_LIVER: ("MRI abdomen", "MRCP", "MRI liver", "MR abdomen w/wo", "MRI abd"),
    MR_PELVIS: ("MRI pelvis", "MR pelvis", "MRI pelvis w/wo", "MR pelvis w and wo", "MRI pelvis with contrast"),
    US_ABD: ("US abdomen", "US abd complete", "Abdominal ultrasound", "US", "US abd"),
    US_RUQ: ("US abdomen", "US RUQ", "US gallbladder", "US liver/GB", "US abd limited"),
    US_PELVIS: ("US pelvis", "Pelvic US", "TVUS", "US pelvic transvaginal", "US"),
    US_RENAL: ("US renal", "Renal US", "US kidneys", "US retroperitoneum", "US kidney/bladder"),
    US_DVT: ("US LE venous", "Venous duplex leg", "US doppler leg", "LE doppler", "US DVT"),
    US_CAROTID: ("US carotid", "Carotid doppler", "Carotid duplex", "US neck vascular"),
    US_THY: ("US thyroid", "Thyroid US", "US neck", "US soft tissue neck"),
    US_OB: ("US OB", "OB ultrasound", "US pregnancy", "US obstetric <14 wks", "TVUS", "US pelvis"),
    XR_CH: ("XR chest", "CXR", "Chest x-ray", "XR chest PA/lat", "Chest 2 views", "CXR 2V"),
    MG_SCREEN: ("Mammogram", "Screening mammo", "Mammo screening bilat", "MG screening", "Mammography"),
    MG_DIAG: ("Mammogram", "Diagnostic mammo", "MG diag", "Mammogram L", "Mammography"),
    NM_BONE: ("NM bone scan", "Bone scan", "Whole body bone scan", "NM bone"),
    NM_MPI: ("NM stress test", "Nuclear stress", "Myocardial perfusion", "Lexiscan", "SPECT MPI", "Cardiac stress"),
    PET: ("PET/CT", "PET CT", "FDG PET", "PET scan", "PET/CT whole body"),
    ECHO: ("Echo", "TTE", "Echocardiogram", "2D echo", "Transthoracic echo"),
}

# Generic orders that say nothing about the protocol.
GENERIC_ORDERS = ("Imaging", "Imaging study", "Diagnostic imaging", "Radiology", "Rad consult", "IMG ORDER",
                  "Radiology exam", "Imaging request", "Outpatient imaging")

# Factor phrasings: (present, absent-but-mentioned).
FACTOR_TEXT: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "renal": (
        ("Cr {cr_hi}", "eGFR {egfr_lo}", "CKD stage 4", "CKD 4, eGFR {egfr_lo}", "AKI, Cr {cr_hi} (baseline 0.9)",
         "renal insufficiency, Cr {cr_hi}", "stage 5 CKD not yet on dialysis", "creatinine {cr_hi}",
         "eGFR {egfr_lo} mL/min", "acute renal failure", "severe CKD (eGFR {egfr_lo}), not on dialysis",
         "acute kidney injury, creatinine up to {cr_hi}", "poor renal function, eGFR {egfr_lo}"),
        ("Cr {cr_ok}", "eGFR >60", "normal renal function", "eGFR {egfr_ok}", "BUN/Cr wnl", "Cr {cr_ok}, eGFR {egfr_ok}",
         "renal function normal", "creatinine {cr_ok}"),
    ),
    "allergy": (
        ("severe contrast allergy (anaphylaxis)", "h/o anaphylaxis to iodinated contrast", "allergy: IV contrast - throat swelling",
         "prior severe reaction to CT contrast", "contrast allergy - hives and wheezing despite premedication",
         "iodinated contrast allergy", "ALLERGIES: iodine contrast (anaphylaxis)", "anaphylactoid reaction to contrast in 2019",
         "severe allergy to IV dye", "allergic to CT dye, intubated last time"),
        ("NKDA", "no known contrast allergy", "no allergies", "tolerated contrast before", "allergies: none",
         "no contrast reactions", "NKA"),
    ),
    "pregnant": (
        ("pregnant, {wk} wks", "G2P1 at {wk} weeks", "{wk}w IUP", "currently {wk} weeks pregnant", "IUP at {wk} wks",
         "pregnant ({wk} wk GA)", "G1P0 @ {wk}wks", "positive hCG, ~{wk} weeks", "{wk} weeks gestation",
         "pregnant - {wk}wks by LMP", "G3P2 {wk}wk"),
        ("hCG neg", "UPT negative", "not pregnant", "urine hCG negative", "serum hCG neg", "beta-hCG negative"),
    ),
    "pacemaker": (
        ("non-MRI-conditional pacemaker", "has pacemaker (not MR safe)", "AICD - MRI contraindicated",
         "legacy pacer, not MR conditional", "cochlear implant, MRI not possible", "metallic orbital foreign body - no MRI",
         "deep brain stimulator, not MR compatible", "MRI unsafe implant", "old abandoned pacer leads, MRI contraindicated",
         "PPM in place, not MRI compatible", "ICD (non-MR-conditional)", "pacemaker dependent, no MRI",
         "older aneurysm clip, MR unsafe", "shrapnel near the orbit, no MRI", "CRT-D device, MRI not allowed",
         "implanted neurostimulator - MRI contraindicated", "pacer, not MR safe", "MR-unsafe cardiac device",
         "insulin pump and old pacemaker, cannot go in the scanner", "has a defibrillator that is not MRI safe"),
        ("no implanted devices", "MRI screening form negative", "no pacemaker", "no metal implants", "cleared for MRI"),
    ),
}

# Past medical history that does not drive the protocol (distractors).
PMH = ("HTN", "HLD", "DM2", "hypothyroidism", "GERD", "OSA on CPAP", "depression", "anxiety", "osteoarthritis",
       "obesity", "asthma", "gout", "migraines", "tobacco use", "seasonal allergies", "anemia", "hypertension",
       "type 2 diabetes", "hyperlipidemia", "prior tonsillectomy", "remote tobacco use", "psoriasis", "IBS",
       "chronic low back pain", "insomnia", "vitamin D deficiency", "glaucoma", "BPH", "prediabetes", "ADHD",
       "s/p knee replacement", "atrial fibrillation", "CAD s/p stent", "hypothyroid on levothyroxine",
       "bipolar disorder", "COPD", "peripheral neuropathy", "restless legs", "eczema", "osteoporosis")
PMH_MALE_ONLY = frozenset({"BPH"})
PMH_FEMALE_ONLY: frozenset[str] = frozenset()

SURGERIES = ("hip replacement", "TKA", "lap chole", "hernia repair", "CABG", "colectomy", "spinal fusion", "hysterectomy",
             "prostatectomy", "thyroidectomy", "shoulder arthroscopy", "AAA repair")
