"""Our FHIR definitions as resources: what a validating server loads to know what we write.

CodeSystems (every local code, with its display), ValueSets over them, StructureDefinitions of our
two extensions, and a profile of each resource type we write (DiagnosticReport, Observation, Media,
Device, Provenance) as a differential on FHIR R4 core: the AI security label required, our
identifier, codes and extensions bound. All under one canonical base (`Conventions.base`), so a site
that moves the base writes its own package (`cds-triage fhir-package`). Pure: dicts in JSON form;
`package_files` adds the NPM package manifest (`package.json`, `.index.json`) that HAPI and the IG
tools read.
"""

from __future__ import annotations

from typing import Any

from . import codes
from .conventions import Conventions, SecurityLabel

FHIR_VERSION = "4.0.1"
CORE = "http://hl7.org/fhir/StructureDefinition"
#: The package name (NPM style, as the FHIR package registry names them).
PACKAGE_NAME = "cds-triage.r4"
PUBLISHER = "cds-triage"
Resource = dict[str, Any]


def _pascal(name: str) -> str:
    return "".join(part.capitalize() for part in name.replace("_", "-").split("-"))


def _common(conventions: Conventions, resource_type: str, id_: str, title: str, description: str, version: str,
            kind: str) -> Resource:
    url = f"{conventions.base}/{kind}/{id_}"
    return {"resourceType": resource_type, "id": id_, "url": url, "version": version, "name": _pascal(id_),
            "title": title, "status": "active", "experimental": False, "publisher": PUBLISHER,
            "description": description}


def code_system(conventions: Conventions, id_: str, title: str, description: str, concepts: dict[str, str],
                version: str) -> Resource:
    """A CodeSystem with every code and its display."""
    resource = _common(conventions, "CodeSystem", id_, title, description, version, "CodeSystem")
    resource.update({"caseSensitive": True, "valueSet": f"{conventions.base}/ValueSet/{id_}", "content": "complete",
                     "count": len(concepts),
                     "concept": [{"code": code, "display": display} for code, display in concepts.items()]})
    return resource


def value_set(conventions: Conventions, id_: str, title: str, version: str) -> Resource:
    """The ValueSet of all codes of our CodeSystem of the same id (what the profiles bind)."""
    resource = _common(conventions, "ValueSet", id_, title, f"All codes of {conventions.code_system(id_)}.",
                       version, "ValueSet")
    resource["compose"] = {"include": [{"system": conventions.code_system(id_)}]}
    return resource


def code_systems(conventions: Conventions, version: str) -> list[Resource]:
    c = conventions
    return [
        code_system(c, codes.FINDING_CODE_SYSTEM, "cds-triage finding labels",
                    "The labels the triage models output; an Observation's code carries one (beside verified SNOMED CT "
                    "and RadLex codes where they exist).", dict(codes.FINDING_DISPLAY), version),
        code_system(c, codes.COMPONENT_CODE_SYSTEM, "cds-triage Observation components",
                    "Components of a triage Observation.", dict(codes.COMPONENT_CODES), version),
        code_system(c, codes.METHOD_CODE_SYSTEM, "cds-triage decision methods",
                    "Which operating threshold turned the AI probability into a result: the model card's or the site's "
                    "own (cds-triage validate).", dict(codes.METHOD_CODES), version),
        code_system(c, codes.TAG_CODE_SYSTEM, "cds-triage tags",
                    "meta.tag codes of what cds-triage writes or owns.", dict(codes.TAG_CODES), version),
        code_system(c, codes.CARD_TOPIC_CODE_SYSTEM, "cds-triage CDS Hooks card topics",
                    "Topics of the CDS Hooks cards.", dict(codes.CARD_TOPIC_CODES), version),
        code_system(c, codes.OVERRIDE_REASON_CODE_SYSTEM, "cds-triage CDS Hooks override reasons",
                    "Why a clinician dismissed a card (CDS Hooks feedback).", dict(codes.OVERRIDE_REASON_CODES), version),
    ]


def value_sets(conventions: Conventions, version: str) -> list[Resource]:
    return [value_set(conventions, id_, title, version) for id_, title in (
        (codes.FINDING_CODE_SYSTEM, "cds-triage finding labels"),
        (codes.COMPONENT_CODE_SYSTEM, "cds-triage Observation components"),
        (codes.METHOD_CODE_SYSTEM, "cds-triage decision methods"),
        (codes.TAG_CODE_SYSTEM, "cds-triage tags"),
    )]


# --- StructureDefinitions ---------------------------------------------------------------------------


def _structure(conventions: Conventions, id_: str, title: str, description: str, version: str, type_: str,
               elements: list[Resource], *, kind: str = "resource", context: str | None = None) -> Resource:
    resource = _common(conventions, "StructureDefinition", id_, title, description, version, "StructureDefinition")
    resource.update({"fhirVersion": FHIR_VERSION, "kind": kind, "abstract": False, "type": type_,
                     "baseDefinition": f"{CORE}/{type_}", "derivation": "constraint"})
    if context:
        # a FHIRPath context: HAPI 8.8.0 fails to make the snapshot of an extension whose context is an
        # `element` ("Unable to resolve package id hl7.fhir.r4.core#null"), and the meaning is the same
        resource["context"] = [{"type": "fhirpath", "expression": context}]
    resource["differential"] = {"element": elements}
    return resource


def _element(path: str, slice_name: str | None = None, **rules: Any) -> Resource:
    element: Resource = {"id": f"{path}:{slice_name}" if slice_name else path, "path": path}
    if slice_name:
        element["sliceName"] = slice_name
    element.update(rules)
    return element


def _sliced(path: str, discriminator: str, kind: str = "value", min_: int | None = None) -> Resource:
    rules: Resource = {"slicing": {"discriminator": [{"type": kind, "path": discriminator}], "rules": "open"}}
    if min_ is not None:
        rules["min"] = min_
    return _element(path, **rules)


def _inside(parent: str, slice_name: str, child: str, **rules: Any) -> Resource:
    return {"id": f"{parent}:{slice_name}.{child}", "path": f"{parent}.{child}", **rules}


def _ai_label_elements(type_: str, labels: tuple[SecurityLabel, ...]) -> list[Resource]:
    """meta.security must carry each AI label (AIAST, and/or the site's own)."""
    path = f"{type_}.meta.security"
    elements = [_element(f"{type_}.meta", min=1), _sliced(path, "$this", "pattern", min_=len(labels))]
    for index, label in enumerate(labels):
        name = "aiAsserted" if index == 0 else f"aiAsserted{index + 1}"
        elements.append(_element(path, name, min=1, max="1",
                                 patternCoding={"system": label.system, "code": label.code}))
    return elements


def _identifier_elements(type_: str, system: str) -> list[Resource]:
    """identifier must carry ours (the deterministic UUID that makes a repeated write-back a no-op)."""
    path = f"{type_}.identifier"
    return [_sliced(path, "system", min_=1), _element(path, "cdsTriage", min=1, max="1"),
            _inside(path, "cdsTriage", "system", min=1, fixedUri=system),
            _inside(path, "cdsTriage", "value", min=1)]


def _narrative(type_: str) -> list[Resource]:
    return [_element(f"{type_}.text", min=1), _element(f"{type_}.text.status", fixedCode="generated")]


def _bound(path: str, value_set_url: str, strength: str = "required", **rules: Any) -> Resource:
    return _element(path, binding={"strength": strength, "valueSet": value_set_url}, **rules)


def _coding_from(path: str, system: str, value_set_url: str) -> list[Resource]:
    """A CodeableConcept's codings must include one from our code system (bound to its value set); codings of
    other systems (verified SNOMED CT and RadLex codes) may stand beside it, unchecked by this binding."""
    return [_sliced(path, "system", min_=1),
            _element(path, "cdsTriage", min=1, max="1", binding={"strength": "required", "valueSet": value_set_url}),
            _inside(path, "cdsTriage", "system", min=1, fixedUri=system),
            _inside(path, "cdsTriage", "code", min=1)]


def _device_reference(path: str) -> Resource:
    return _element(path, min=1, type=[{"code": "Reference", "targetProfile": [f"{CORE}/Device"]}])


def profiles(conventions: Conventions, version: str) -> list[Resource]:
    c = conventions
    findings = f"{c.base}/ValueSet/{codes.FINDING_CODE_SYSTEM}"

    def profile(type_: str, title: str, description: str, elements: list[Resource]) -> Resource:
        return _structure(c, codes.profile_id(type_), title, description, version, type_, elements)

    observation = profile("Observation", "cds-triage AI probability Observation",
                          "One trained label's study-level AI probability, preliminary, AI-asserted.", [
        *_ai_label_elements("Observation", c.ai_labels), *_narrative("Observation"),
        *_identifier_elements("Observation", c.result_identifier_system),
        _element("Observation.category", min=1),
        *_coding_from("Observation.code.coding", c.finding_system, findings),
        _element("Observation.effective[x]", type=[{"code": "dateTime"}]),
        _element("Observation.issued", min=1),
        _element("Observation.value[x]", min=1, type=[{"code": "Quantity"}],
                 patternQuantity={"system": codes.UCUM_SYSTEM, "code": codes.UCUM_UNITY}),
        _bound("Observation.method", f"{c.base}/ValueSet/{codes.METHOD_CODE_SYSTEM}", min=1),
        _device_reference("Observation.device"),
        _element("Observation.derivedFrom", min=1),
        _bound("Observation.component.code", f"{c.base}/ValueSet/{codes.COMPONENT_CODE_SYSTEM}"),
    ])
    report = profile("DiagnosticReport", "cds-triage AI triage DiagnosticReport",
                     "The preliminary AI triage report of one study: its Observations, heatmap and conclusion.", [
        *_ai_label_elements("DiagnosticReport", c.ai_labels), *_narrative("DiagnosticReport"),
        *_identifier_elements("DiagnosticReport", c.result_identifier_system),
        _element("DiagnosticReport.code", patternCodeableConcept={"coding": [
            {"system": codes.LOINC_SYSTEM, "code": codes.LOINC_DIAGNOSTIC_IMAGING_STUDY}]}),
        _element("DiagnosticReport.effective[x]", type=[{"code": "dateTime"}]),
        _element("DiagnosticReport.issued", min=1),
        _element("DiagnosticReport.imagingStudy", min=1),
        _element("DiagnosticReport.conclusion", min=1),
        *_coding_from("DiagnosticReport.conclusionCode.coding", c.finding_system, findings),
    ])
    extension = "Media.extension"
    media = profile("Media", "cds-triage Grad-CAM heatmap Media",
                    "The Grad-CAM overlay of the top finding, inline PNG, AI-asserted; not a diagnostic image.", [
        *_ai_label_elements("Media", c.ai_labels), *_narrative("Media"),
        _sliced(extension, "url"),
        _element(extension, "heatmapSource", max="1", type=[{"code": "Extension", "profile": [c.heatmap_source_extension]}]),
        *_identifier_elements("Media", c.result_identifier_system),
        _device_reference("Media.device"),
        _element("Media.content.contentType", min=1, fixedCode="image/png"),
        _element("Media.content.data", min=1),
    ])
    device = profile("Device", "cds-triage AI model Device", "One AI model (name and version) of cds-triage.", [
        *_narrative("Device"), *_identifier_elements("Device", c.device_identifier_system),
        _element("Device.deviceName", min=1), _element("Device.version", min=1),
    ])
    tag = "Provenance.meta.tag"
    provenance = profile("Provenance", "cds-triage AI triage Provenance",
                         "Which model (Device) made the results from which ImagingStudy, and when.", [
        _element("Provenance.meta", min=1), _sliced(tag, "system", min_=1),
        _element(tag, "cdsTriageId", min=1, max="1"),
        _inside(tag, "cdsTriageId", "system", min=1, fixedUri=codes.URI_SYSTEM),
        _inside(tag, "cdsTriageId", "code", min=1),
        *_narrative("Provenance"),
        _element("Provenance.agent.who", type=[{"code": "Reference", "targetProfile": [f"{CORE}/Device"]}]),
        _element("Provenance.entity", min=1),
    ])
    return [report, observation, media, device, provenance]


def extensions(conventions: Conventions, version: str) -> list[Resource]:
    c = conventions
    heatmap = _structure(
        c, codes.HEATMAP_SOURCE_EXTENSION_ID, "Heatmap source instance",
        "On a cds-triage heatmap Media: the DICOM SOP Instance UID of the slice the overlay explains, so a viewer can "
        "fetch it from the PACS to lay it under.", version, "Extension", [
            _element("Extension.extension", max="0"),
            _element("Extension.url", fixedUri=c.heatmap_source_extension),
            _element("Extension.value[x]", min=1, type=[{"code": "oid"}]),
        ], kind="complex-type", context="Media")
    priorities = "http://hl7.org/fhir/ValueSet/request-priority|4.0.1"
    parent = "Extension.extension"
    change = _structure(
        c, codes.PRIORITY_CHANGE_EXTENSION_ID, "AI priority change",
        "On the ServiceRequest.note cds-triage leaves when it raises an order's priority: the priority before "
        "(`from`, absent when the order had none) and after (`to`). Readers take the change from here, never from "
        "the note's words.", version, "Extension", [
            _sliced(parent, "url", min_=1),
            _element(parent, "from", max="1"),
            _inside(parent, "from", "url", fixedUri=codes.PRIORITY_CHANGE_FROM),
            {**_inside(parent, "from", "value[x]", min=1, type=[{"code": "code"}]),
             "binding": {"strength": "required", "valueSet": priorities}},
            _element(parent, "to", min=1, max="1"),
            _inside(parent, "to", "url", fixedUri=codes.PRIORITY_CHANGE_TO),
            {**_inside(parent, "to", "value[x]", min=1, type=[{"code": "code"}]),
             "binding": {"strength": "required", "valueSet": priorities}},
            _element("Extension.url", fixedUri=c.priority_change_extension),
            _element("Extension.value[x]", max="0"),
        ], kind="complex-type", context="ServiceRequest.note")
    return [heatmap, change]


def definitions(conventions: Conventions, version: str) -> list[Resource]:
    """Every definition resource of the package, for these conventions and this version."""
    return [*code_systems(conventions, version), *value_sets(conventions, version), *extensions(conventions, version),
            *profiles(conventions, version)]


def package_manifest(conventions: Conventions, version: str) -> Resource:
    """package.json of the FHIR NPM package (the fields the FHIR package spec and HAPI read)."""
    return {
        "name": PACKAGE_NAME, "version": version, "type": "fhir.ig", "canonical": conventions.base,
        "url": conventions.base, "title": "cds-triage FHIR definitions",
        "description": "Code systems, value sets, extensions and profiles of what cds-triage (AI radiology triage) "
                       "writes to a FHIR R4 server.",
        "fhirVersions": [FHIR_VERSION], "dependencies": {"hl7.fhir.r4.core": FHIR_VERSION},
        "author": PUBLISHER, "license": "CC0-1.0",
    }


def package_files(conventions: Conventions, version: str) -> dict[str, Resource]:
    """The package's files under package/: package.json, .index.json and one JSON file per resource."""
    resources = definitions(conventions, version)
    files: dict[str, Resource] = {"package.json": package_manifest(conventions, version)}
    index = []
    for resource in resources:
        name = f"{resource['resourceType']}-{resource['id']}.json"
        files[name] = resource
        entry = {"filename": name, "resourceType": resource["resourceType"], "id": resource["id"],
                 "url": resource["url"], "version": version}
        if resource["resourceType"] == "StructureDefinition":
            entry.update(kind=resource["kind"], type=resource["type"])
        index.append(entry)
    files[".index.json"] = {"index-version": 1, "files": index}
    return files
