"""Label sources cannot be forged: each discovery source gives labels of its own source.

A label's source (``container:``, ``libvirt:``, ``static:``, ``service:`` ...) says who
vouches for it, and policies may select on it (``static:role=gateway``). So a source of
endpoints may only give labels of its own source:

    endpoint source    label source    who writes the labels
    podman, docker     container       whoever runs the container, and the image's author
    libvirt            libvirt         the domain's <metadata> (the host's administrator)
    static             static          the API (root on this host)
    (services)         service         the inventory (inventory.py refuses other sources)

A key without a source gets the endpoint's; a key that names the endpoint's own source
keeps it. Everything else is dropped, never silently: the endpoint lists it in
``dropped_labels`` (API, ``stockade endpoint list -o json``, the web UI), the agent logs it
and counts it in ``stockade_labels_dropped_total{source, cause}``. A dropped label is

    {"label": "static:role=gateway",                  # key=value as the source gave it
     "reason": "source static is not container: labels of podman endpoints have source container",
     "cause": "other-source"}                         # one of CAUSES

Causes: ``other-source`` (the key names another source, ``any:`` included),
``reserved`` (``reserved:`` is Stockade's own identities), ``invalid`` (not a valid key or
value), ``image`` (Docker and Podman merge an image's LABELs into the container's labels:
a container label whose key and value are the image's own is the image author's claim,
not the operator's, and is dropped unless the agent runs with ``trust_image_labels``).

The API refuses ``reserved`` and ``invalid`` labels of static endpoints with a 400 instead
(endpoints.parse_spec); a runtime's container or VM is managed with what remains.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

from ..policy.labels import Label, LabelSet, check_key, check_value, split_source

# endpoint source -> the label source it gives
LABEL_SOURCE = {"podman": "container", "docker": "container", "libvirt": "libvirt",
                "static": "static"}
CAUSES = ("other-source", "reserved", "invalid", "image")
# The (endpoint source, cause) pairs that can happen: the metric starts them at 0.
POSSIBLE = {"podman": CAUSES, "docker": CAUSES, "libvirt": CAUSES[:3], "static": CAUSES[:1]}
MAX_LISTED = 64    # dropped labels listed per endpoint (all of them are counted)
MAX_TEXT = 200     # characters of a dropped label's text kept (label values are unbounded)
RESERVED_REASON = "reserved labels cannot be given to endpoints"


@dataclass(frozen=True)
class DroppedLabel:
    label: str          # "key=value" as the source gave it (cut at MAX_TEXT)
    reason: str
    cause: str          # one of CAUSES
    key: str = field(default="", compare=False)  # the raw key, for error paths; not persisted

    def to_dict(self) -> dict:
        return {"label": self.label, "reason": self.reason, "cause": self.cause}

    @classmethod
    def from_dict(cls, d: dict) -> "DroppedLabel":
        return cls(str(d["label"]), str(d["reason"]), str(d["cause"]))


def _cut(text: str, limit: int = MAX_TEXT) -> str:
    return text if len(text) <= limit else text[:limit - 1] + "…"


def _text(key, value) -> str:
    return _cut(f"{key}={value}" if value != "" else str(key))


def _why_dropped(key, value, source: str, image_labels: Mapping | None
                 ) -> tuple[str, str] | tuple[None, Label]:
    """(cause, reason) for a label that is dropped, else (None, the Label)."""
    if not isinstance(key, str):
        return "invalid", f"label key {key!r} is not a string"
    if value is not None and not isinstance(value, (str, int, float, bool)):
        return "invalid", f"label {key!r} must map to a string"
    text = "" if value is None else str(value)
    if ":" in key:
        src, name = split_source(key)
        if src == "reserved":
            return "reserved", RESERVED_REASON
        if src != source:
            why = check_key(key)
            if why and why.startswith("unknown label source"):
                return "invalid", why
            return "other-source", (f"source {src} is not {source}: labels of "
                                    f"{_whose(source)} have source {source}")
    else:
        name = key
    why = check_key(name) or check_value(text)
    if why:
        return "invalid", why
    if image_labels is not None and key in image_labels and str(image_labels[key]) == text:
        return "image", ("key and value come from the image's own labels, which are not "
                         "trusted (trust_image_labels is off)")
    return None, Label(source, name, text)


def _whose(source: str) -> str:
    return {"container": "containers", "libvirt": "libvirt domains",
            "static": "static endpoints"}.get(source, f"{source} endpoints")


def admit_labels(raw: Mapping, endpoint_source: str, *, image_labels: Mapping | None = None
                 ) -> tuple[LabelSet, list[DroppedLabel]]:
    """The labels an endpoint of ``endpoint_source`` gets from ``raw``, and those dropped.

    image_labels: the image's own labels when they are not trusted (None: trusted, or the
    endpoint has no image). Pure: no logging, no counting (the agent does both).
    """
    source = LABEL_SOURCE[endpoint_source]
    kept: dict[str, tuple[str, Label]] = {}   # label key -> (raw key, label)
    dropped: list[DroppedLabel] = []
    for key, value in sorted(raw.items(), key=lambda kv: str(kv[0])):
        cause, result = _why_dropped(key, value, source, image_labels)
        if isinstance(result, Label) and result.key in kept:
            cause, result = "invalid", f"label {result.key!r} is also given as {kept[result.key][0]!r}"
        if isinstance(result, Label):
            kept[result.key] = (key, result)
        else:
            dropped.append(DroppedLabel(_text(key, "" if value is None else value),
                                        _cut(result, 2 * MAX_TEXT), cause or "invalid",
                                        key=key if isinstance(key, str) else repr(key)))
    return LabelSet(label for _, label in kept.values()), dropped
