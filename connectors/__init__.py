"""The outside world: Kafka (``kafka``), the FHIR REST API (``fhir``), fixture replay (``replay``)
and the embedded local services for the demo and tests (``embedded``). Depends on ``schemas`` only.

Submodules are imported explicitly (``from connectors.fhir import FhirClient``) so that using one
does not pull in the others' dependencies.
"""
