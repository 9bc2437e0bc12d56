"""Ordered-exam names as hospitals send them in ``ServiceRequest.code.text``, per protocol.

Real order catalogs name the exam, not the protocol: "CT CHEST W CONTRAST", "MRI BRAIN W/WO",
"MRI spine", "NM MYOCARDIAL PERFUSION STRESS", "US OB <14 WKS", "XR CHEST PA/LAT", "PET/CT",
"ECHO TTE". Each name is composed of a modality word, a region word and (often) a contrast
phrase, in upper case about half the time; a share of orders name only the region family ("MRI
spine") or leave the contrast open ("CT head"), so the indication has to decide. Every pool is
split between train and test (``split_pool``), so the test split reads names training never saw.
The name always fits the protocol's modality and region (``schemas.exams`` masks on it).
"""

from __future__ import annotations

import random

from . import protocol_kb as kb

CONTRAST_TEXT = {
    "wo": ("WO", "W/O", "WO CONTRAST", "W/O CONTRAST", "WITHOUT CONTRAST", "NON-CONTRAST", "NONCON", "WO IV CONTRAST",
           "NO CONTRAST", "W/O IV CONTRAST", "NONCONTRAST", "WITHOUT IV CONTRAST"),
    "w": ("W CONTRAST", "W/ CONTRAST", "WITH CONTRAST", "W IV CONTRAST", "W/CONTRAST", "WITH IV CONTRAST", "W",
          "W CON", "W/ IV CONTRAST", "CONTRAST", "W IV CON", "CONTRAST ENHANCED"),
    "wwo": ("W/WO", "W WO", "W/WO CONTRAST", "WITH AND WITHOUT CONTRAST", "W AND WO CONTRAST", "WO/W", "W + WO",
            "WITHOUT AND WITH CONTRAST", "W & W/O CONTRAST", "W/ & W/O", "WWO", "W/WO IV CONTRAST"),
}
CT = ("CT", "CT", "CT", "CAT SCAN", "CT SCAN")
CTA = ("CTA", "CT ANGIO", "CTA", "CT ANGIOGRAM", "CT ANGIOGRAPHY")
MR = ("MRI", "MR", "MRI", "MRI", "MR", "MAGNETIC RESONANCE")
US = ("US", "US", "ULTRASOUND", "US", "SONOGRAM", "U/S")
XR = ("XR", "X-RAY", "XR", "DX", "XRAY", "RAD")
_BRAIN = ("BRAIN", "HEAD", "BRAIN", "HEAD", "BRAIN/HEAD", "BRAIN")

# protocol -> (modalities, regions, contrast mix {"wo"|"w"|"wwo"|"": share}, whole names, share of whole names)
SPECS: dict[str, tuple[tuple[str, ...], tuple[str, ...], dict[str, float], tuple[str, ...], float]] = {
    kb.CTH: (CT, ("HEAD", "BRAIN", "HEAD", "HEAD/BRAIN", "HEAD", "BRAIN"), {"wo": 0.55, "": 0.45},
             ("NCCT HEAD", "CT HEAD NONCON", "HEAD CT", "CT BRAIN STROKE ALERT", "CT HEAD TRAUMA"), 0.12),
    kb.CTH_WWO: (CT, ("HEAD", "BRAIN", "HEAD", "HEAD/BRAIN"), {"wwo": 0.6, "": 0.3, "w": 0.1},
                 ("CT HEAD W AND WO", "CT BRAIN W/WO CONTRAST", "CT HEAD PRE AND POST CONTRAST"), 0.08),
    kb.CTA_HN: (CTA, ("HEAD AND NECK", "HEAD/NECK", "HEAD & NECK", "NECK", "HEAD", "HEAD NECK", "NECK AND HEAD"),
                {"": 0.6, "w": 0.4},
                ("CODE STROKE CTA HEAD/NECK", "CT ANGIO HEAD AND NECK W CONTRAST", "CTA H&N", "CT STROKE PROTOCOL W CTA",
                 "CTA NECK W CONTRAST", "CTA CAROTIDS"), 0.2),
    kb.CT_CS: (CT, ("CERVICAL SPINE", "C-SPINE", "C SPINE", "SPINE CERVICAL", "CSPINE", "CERVICAL SPINE"), {"wo": 0.5, "": 0.5},
               ("CT C-SPINE TRAUMA", "CT CERVICAL SPINE WO", "CT NECK/C-SPINE"), 0.1),
    kb.CT_CH_WO: (CT, ("CHEST", "THORAX", "CHEST", "LUNGS", "CHEST"), {"wo": 0.55, "": 0.45},
                  ("HRCT CHEST", "LDCT LUNG CANCER SCREENING", "CT CHEST LOW DOSE", "CT CHEST HIGH RESOLUTION",
                   "CT LUNG SCREENING", "CT CHEST ILD PROTOCOL"), 0.15),
    kb.CT_CH_W: (CT, ("CHEST", "THORAX", "CHEST", "CHEST"), {"w": 0.6, "": 0.4},
                 ("CT CHEST W IV CONTRAST", "CT THORAX WITH CONTRAST", "CECT CHEST"), 0.08),
    kb.CTA_PE: (CTA, ("CHEST", "CHEST", "PULMONARY", "CHEST PE", "THORAX"), {"": 0.6, "w": 0.4},
                ("CT CHEST PE PROTOCOL", "CTPA", "CT PULMONARY ANGIOGRAM", "CTA CHEST PE PROTOCOL", "CT CHEST W CONTRAST",
                 "CT CHEST", "CT PE STUDY", "CTA PULMONARY EMBOLISM"), 0.35),
    kb.CT_AP: (CT, ("ABDOMEN PELVIS", "ABD/PELVIS", "ABD PELVIS", "A/P", "ABDOMEN AND PELVIS", "ABDOMEN", "ABD/PEL",
                    "ABDOMEN/PELVIS"), {"w": 0.6, "": 0.4},
               ("CTAP W CONTRAST", "CT A/P W IV AND ORAL CONTRAST", "CT ABDOMEN/PELVIS W", "CT ABD PEL W IV"), 0.08),
    kb.CT_STONE: (CT, ("ABDOMEN PELVIS", "ABD/PELVIS", "A/P", "ABDOMEN AND PELVIS", "ABD PEL"), {"wo": 0.65, "": 0.35},
                  ("CT RENAL STONE PROTOCOL", "CT KUB", "CT ABD/PELVIS STONE PROTOCOL", "CT STONE STUDY", "CT UROLITHIASIS",
                   "CT ABDOMEN PELVIS WO (STONE)", "CT A/P RENAL COLIC"), 0.35),
    kb.CT_LIVER: (CT, ("ABDOMEN", "LIVER", "ABD", "ABDOMEN"), {"wwo": 0.35, "w": 0.35, "": 0.3},
                  ("CT LIVER TRIPHASIC", "CT ABDOMEN MULTIPHASE LIVER", "CT ABD LIVER PROTOCOL", "CT LIVER 3 PHASE",
                   "CT ABDOMEN HCC PROTOCOL", "CT LIVER MASS PROTOCOL"), 0.35),
    kb.CT_SINUS: (CT, ("SINUS", "SINUSES", "MAXILLOFACIAL", "FACIAL BONES", "FACE", "PARANASAL SINUSES", "ORBITS/FACE"),
                  {"wo": 0.5, "": 0.5}, ("CT MAXFACE", "CT SINUS SCREENING", "CT FACIAL BONES TRAUMA"), 0.1),
    kb.MRB: (MR, _BRAIN, {"wo": 0.45, "": 0.5, "wwo": 0.05},
             ("MRI BRAIN STROKE PROTOCOL", "MRI BRAIN DEMENTIA PROTOCOL", "MRI HEAD WO", "MR BRAIN NONCONTRAST"), 0.08),
    kb.MRB_WWO: (MR, _BRAIN, {"wwo": 0.55, "": 0.4, "w": 0.05},
                 ("MRI BRAIN MS PROTOCOL", "MRI BRAIN TUMOR PROTOCOL", "MRI BRAIN/IAC W/WO", "MRI PITUITARY W/WO",
                  "MRI BRAIN SEIZURE PROTOCOL", "MRI ORBITS/BRAIN W/WO", "MRI BRAIN W GAD"), 0.12),
    kb.MR_CS: (MR, ("CERVICAL SPINE", "C-SPINE", "C SPINE", "SPINE CERVICAL", "CSPINE", "SPINE", "SPINE", "SPINE"),
               {"wo": 0.4, "": 0.55, "wwo": 0.05}, ("MRI NECK SPINE", "MRI SPINE CERVICAL WO", "MRI C/S"), 0.05),
    kb.MR_LS: (MR, ("LUMBAR SPINE", "L-SPINE", "LUMBAR", "LS SPINE", "SPINE", "LUMBOSACRAL SPINE", "SPINE", "SPINE"),
               {"wo": 0.4, "": 0.55, "wwo": 0.05}, ("MRI BACK", "MRI LOW BACK", "MRI SPINE LUMBAR WO", "MRI L/S"), 0.05),
    kb.MR_KNEE: (MR, ("KNEE", "R KNEE", "L KNEE", "RIGHT KNEE", "LEFT KNEE", "KNEE LT", "KNEE RT", "KNEE JOINT"),
                 {"wo": 0.4, "": 0.6}, ("MRI LOWER EXTREMITY JOINT KNEE", "MRI KNEE ARTHROGRAM"), 0.05),
    kb.MR_SH: (MR, ("SHOULDER", "R SHOULDER", "L SHOULDER", "RIGHT SHOULDER", "LEFT SHOULDER", "SHOULDER RT"),
               {"wo": 0.4, "": 0.6}, ("MRI UPPER EXTREMITY JOINT SHOULDER", "MR ARTHROGRAM SHOULDER"), 0.05),
    kb.MR_LIVER: (MR, ("ABDOMEN", "LIVER", "ABD", "ABDOMEN", "PANCREAS"), {"wwo": 0.5, "": 0.4, "w": 0.1},
                  ("MRCP", "MRI ABDOMEN W/WO MRCP", "MRI LIVER W/WO", "MR LIVER EOVIST", "MRCP WO", "MRI ABD LIVER PROTOCOL"),
                  0.3),
    kb.MR_PELVIS: (MR, ("PELVIS", "PELVIS", "PELVIS FEMALE", "PROSTATE", "RECTUM", "PELVIC"), {"wwo": 0.5, "": 0.4, "w": 0.1},
                   ("MRI PROSTATE MULTIPARAMETRIC", "MRI PELVIS RECTAL CA STAGING", "MRI PELVIS FISTULA", "MRI UTERUS"), 0.1),
    kb.US_ABD: (US, ("ABDOMEN", "ABDOMEN COMPLETE", "ABD COMPLETE", "ABD", "ABDOMINAL", "ABDOMEN COMP"), {"": 1.0},
                ("ABDOMINAL ULTRASOUND", "US ABDOMEN COMPLETE", "SONOGRAM ABDOMEN"), 0.1),
    kb.US_RUQ: (US, ("RUQ", "ABDOMEN LIMITED", "GALLBLADDER", "LIVER", "ABD RUQ", "ABDOMEN", "RIGHT UPPER QUADRANT",
                     "GB", "HEPATOBILIARY"), {"": 1.0}, ("RUQ ULTRASOUND", "GALLBLADDER ULTRASOUND", "US LIVER/GB"), 0.1),
    kb.US_PELVIS: (US, ("PELVIS", "PELVIC", "PELVIS TRANSVAGINAL", "TRANSVAGINAL", "PELVIS COMPLETE", "PELVIS TA/TV",
                        "PELVIS NON-OB"), {"": 1.0}, ("TVUS", "PELVIC ULTRASOUND", "TRANSVAGINAL ULTRASOUND"), 0.12),
    kb.US_RENAL: (US, ("RENAL", "KIDNEYS", "RENAL/BLADDER", "RETROPERITONEAL", "KIDNEY", "RENAL COMPLETE", "KIDNEYS AND BLADDER"),
                  {"": 1.0}, ("RENAL ULTRASOUND", "US RETROPERITONEUM COMPLETE", "KIDNEY SONO"), 0.1),
    kb.US_DVT: (US, ("LE VENOUS DUPLEX", "VENOUS DOPPLER LOWER EXTREMITY", "DUPLEX VENOUS LEG", "LOWER EXTREMITY VENOUS",
                     "VENOUS LE BILAT", "VENOUS DUPLEX R LEG", "LE DOPPLER", "VENOUS DOPPLER L LEG", "DVT STUDY LE"),
                {"": 1.0}, ("LE VENOUS DOPPLER", "VENOUS DUPLEX LOWER EXTREMITY BILATERAL", "DVT ULTRASOUND LEG"), 0.15),
    kb.US_CAROTID: (US, ("CAROTID DUPLEX", "CAROTID DOPPLER", "CAROTID BILATERAL", "CAROTIDS", "CAROTID ARTERIES"),
                    {"": 1.0}, ("CAROTID DUPLEX BILATERAL", "CAROTID DOPPLER STUDY", "VASCULAR CAROTID"), 0.15),
    kb.US_THY: (US, ("THYROID", "NECK SOFT TISSUE", "THYROID/PARATHYROID", "THYROID", "HEAD/NECK SOFT TISSUE"),
                {"": 1.0}, ("THYROID ULTRASOUND", "THYROID SONOGRAM", "US NECK THYROID"), 0.12),
    kb.US_OB: (US, ("OB", "OB <14 WKS", "OB >14 WKS", "OB COMPLETE", "OB LIMITED", "PREGNANCY", "OB TRANSVAGINAL",
                    "OB FOLLOW UP", "OB ANATOMY", "OB 1ST TRIMESTER", "OB DATING"), {"": 1.0},
               ("OB ULTRASOUND", "FETAL ANATOMY SURVEY", "BPP", "OBSTETRIC ULTRASOUND", "EARLY PREGNANCY US"), 0.2),
    kb.XR_CH: (XR, ("CHEST PA/LAT", "CHEST 2 VIEWS", "CHEST PA AND LATERAL", "CHEST 2V", "CHEST", "CHEST PA LAT",
                    "CHEST 1 VIEW", "CHEST AP PORTABLE", "CHEST 2 VW"), {"": 1.0},
               ("CXR", "CHEST X-RAY", "CHEST XRAY 2 VIEWS", "CXR PA/LAT", "PORTABLE CXR", "CHEST RADIOGRAPH"), 0.25),
    kb.MG_SCREEN: (("MAMMO", "MG", "MAMMOGRAM", "MAMMOGRAPHY"), ("SCREENING BILAT", "SCREENING BILATERAL", "SCREENING",
                   "SCREENING W TOMO", "3D SCREENING", "SCREEN BIL"), {"": 1.0},
                   ("SCREENING MAMMOGRAM", "ANNUAL MAMMOGRAM", "MAMMOGRAM", "3D MAMMO SCREENING"), 0.25),
    kb.MG_DIAG: (("MAMMO", "MG", "MAMMOGRAM", "MAMMOGRAPHY"), ("DIAGNOSTIC", "DIAG LEFT", "DIAGNOSTIC R", "DIAG BILAT",
                 "DIAGNOSTIC UNILATERAL", "DIAGNOSTIC W TOMO LEFT"), {"": 1.0},
                 ("DIAGNOSTIC MAMMOGRAM", "MAMMOGRAM", "MAMMO DX LEFT", "BREAST IMAGING DIAGNOSTIC"), 0.2),
    kb.NM_BONE: (("NM", "NUC MED", "NM"), ("BONE SCAN WHOLE BODY", "BONE SCAN", "WHOLE BODY BONE", "SKELETAL SCINTIGRAPHY",
                 "BONE SCAN 3 PHASE"), {"": 1.0}, ("BONE SCAN", "WHOLE BODY BONE SCAN", "TC99 MDP BONE SCAN"), 0.3),
    kb.NM_MPI: (("NM", "NUC MED", "NM"), ("MYOCARDIAL PERFUSION STRESS", "CARDIAC STRESS", "MYOCARDIAL PERFUSION SPECT",
                "MPI REST/STRESS", "STRESS TEST", "LEXISCAN MPI", "MYOCARDIAL PERFUSION", "CARDIAC SPECT"), {"": 1.0},
                ("NUCLEAR STRESS TEST", "LEXISCAN", "SPECT MPI", "MYOCARDIAL PERFUSION IMAGING", "CARDIAC STRESS TEST NUCLEAR",
                 "REGADENOSON STRESS TEST", "STRESS TEST", "SESTAMIBI STRESS", "PHARMACOLOGIC NUCLEAR STRESS"), 0.4),
    kb.PET: (("PET/CT", "PET CT", "PET-CT", "NM PET/CT"), ("SKULL BASE TO MID THIGH", "WHOLE BODY", "", "TUMOR IMAGING",
             "FDG", "SKULL BASE-MIDTHIGH", "ONCOLOGY"), {"": 1.0},
             ("PET/CT", "PET SCAN", "FDG PET/CT", "PET CT INITIAL STAGING", "PET/CT RESTAGING"), 0.3),
    kb.ECHO: (("ECHO", "TTE", "ECHO"), ("TTE", "COMPLETE", "", "2D W DOPPLER", "TRANSTHORACIC", "LIMITED", "ADULT COMPLETE"),
              {"": 1.0}, ("ECHOCARDIOGRAM", "TTE", "TRANSTHORACIC ECHO", "2D ECHO", "ECHO COMPLETE W DOPPLER",
                          "ECHOCARDIOGRAM TRANSTHORACIC"), 0.35),
}

GENERIC = {
    "train": ("Imaging", "Diagnostic imaging", "Radiology", "IMG ORDER", "Imaging request", "Outpatient imaging"),
    "test": ("Imaging study", "Rad consult", "Radiology exam"),
}


def _case(text: str, rng: random.Random) -> str:
    r = rng.random()
    if r < 0.5:
        return text.upper()
    if r < 0.65:
        return " ".join(w if w.isupper() and len(w) <= 4 else w.capitalize() for w in text.lower().split())
    # mixed: modality abbreviation upper, rest lower ("CT chest w contrast")
    words = text.split()
    return " ".join(w if i == 0 else w.lower() for i, w in enumerate(words))


def exam_name(display: str, rng: random.Random, pool: str, split) -> str | None:
    """One ordered-exam name for the protocol ``display`` (``None``: the order has no code text).
    ``split``: ``protocol.split_pool`` (passed in to avoid an import cycle)."""
    r = rng.random()
    if r < 0.03:
        return None
    if r < 0.07:
        return rng.choice(GENERIC[pool])
    mods, regions, mix, whole, whole_share = SPECS[display]
    if rng.random() < whole_share:
        return _case(rng.choice(split(whole, pool)), rng)
    mod = rng.choice(mods)
    region = rng.choice(split(regions, pool))
    kind = rng.choices(list(mix), weights=list(mix.values()))[0]
    contrast = rng.choice(split(CONTRAST_TEXT[kind], pool)) if kind else ""
    s = rng.random()
    if s < 0.8 or not region:
        text = f"{mod} {region} {contrast}"
    elif s < 0.9:
        text = f"{region} {mod} {contrast}"
    else:
        text = f"{mod} {region}, {contrast}" if contrast else f"{mod} of the {region.lower()}"
    return _case(" ".join(text.split()).rstrip(","), rng)
