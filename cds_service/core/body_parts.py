"""The body-part words our DICOM headers and EHR texts are read for: one vocabulary for routing
(which task reads a series) and the input check (is a series routed to a task of another anatomy).

Headers are filled inconsistently across scanners and emptied by many de-identifiers, so each
anatomy accepts a few synonyms; a text is read upper-cased, with a space appended (so "PA " matches
at the end).
"""

from __future__ import annotations

HEAD_WORDS = ("HEAD", "BRAIN", "SKULL", "CRANIUM", "CEREBR", "NEURO")
CHEST_WORDS = ("CHEST", "THORAX", "LUNG", "PA ", "CXR")
VIEW_WORDS = ("PA ",)  # a projection, taken as "chest" by routing; a hand or a knee is X-rayed PA too
# Body parts none of our models reads: a series whose header names one of these (and not the task's
# own anatomy) is another body part, whatever the order said. "NECK" is not among them: head CTs are
# often "HEAD/NECK" protocols.
OTHER_WORDS = ("KNEE", "ANKLE", "FOOT", "HAND", "WRIST", "ELBOW", "SHOULDER", "HIP ", "PELVIS", "ABDOMEN", "ABDO",
               "SPINE", "LUMBAR", "SACRUM", "FEMUR", "TIBIA", "HUMERUS", "BREAST", "MAMMO", "CARDIAC", "HEART",
               "LIVER", "KIDNEY", "RENAL", "PROSTATE", "EXTREMITY", "LEG ", "ARM ")
ANATOMY_WORDS = {"head": HEAD_WORDS, "chest": CHEST_WORDS}


def anatomy_of_words(text: str, views: bool = True) -> str | None:
    """'head' or 'chest' when the text names one (head first), else None. `views=False`: a projection
    alone ("PA") names no anatomy."""
    text = text.upper() + " "
    for anatomy, words in ANATOMY_WORDS.items():
        if any(word in text for word in words if views or word not in VIEW_WORDS):
            return anatomy
    return None


def other_body_part(text: str) -> str | None:
    """The first body part the text names that none of our models reads, e.g. 'KNEE', else None."""
    text = text.upper() + " "
    return next((word.strip() for word in OTHER_WORDS if word in text), None)
