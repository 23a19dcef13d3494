"""WinCLIP's compositional prompt ensemble (Jeong et al., CVPR 2023, Sec. 4.1 and appendix).

Every state word (a normal or an anomalous description of the object) is put into every
template; the text embeddings of one class are averaged into its prototype. The lists are
kept here, once. The state words are the paper's; the templates are the paper's list of
template-level prompts (22 of them; the anomalib copy has 21, one of them twice).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

#: State words of a normal object (``{}``: the class name).
NORMAL_STATES: tuple[str, ...] = (
    "{}", "flawless {}", "perfect {}", "unblemished {}", "{} without flaw", "{} without defect", "{} without damage",
)
#: State words of an anomalous object.
ANOMALOUS_STATES: tuple[str, ...] = ("damaged {}", "{} with flaw", "{} with defect", "{} with damage")
#: Templates (``{}``: a state word with the class name in it).
TEMPLATES: tuple[str, ...] = (
    "a cropped photo of the {}.", "a cropped photo of a {}.",
    "a close-up photo of a {}.", "a close-up photo of the {}.",
    "a bright photo of a {}.", "a bright photo of the {}.",
    "a dark photo of the {}.", "a dark photo of a {}.",
    "a jpeg corrupted photo of a {}.", "a jpeg corrupted photo of the {}.",
    "a blurry photo of the {}.", "a blurry photo of a {}.",
    "a photo of a {}.", "a photo of the {}.",
    "a photo of a small {}.", "a photo of the small {}.",
    "a photo of a large {}.", "a photo of the large {}.",
    "a photo of the {} for visual inspection.", "a photo of a {} for visual inspection.",
    "a photo of the {} for anomaly detection.", "a photo of a {} for anomaly detection.",
)


def prompt_ensemble(class_name: str) -> tuple[list[str], list[str]]:
    """The normal and the anomalous prompts of ``class_name``: every state x every template
    (state-major). Underscores in the name are read as spaces.

    >>> normal, anomalous = prompt_ensemble("metal_nut")
    >>> len(normal), len(anomalous), normal[0], anomalous[-1]
    (154, 88, 'a cropped photo of the metal nut.', 'a photo of a metal nut with damage for anomaly detection.')
    """
    name = class_name.strip().replace("_", " ")
    normal = [t.format(s.format(name)) for s in NORMAL_STATES for t in TEMPLATES]
    anomalous = [t.format(s.format(name)) for s in ANOMALOUS_STATES for t in TEMPLATES]
    return normal, anomalous


def class_prototypes(normal: torch.Tensor, anomalous: torch.Tensor) -> torch.Tensor:
    """The two class prototypes ``(2, E)`` (row 0 normal, row 1 anomalous) from the prompt
    embeddings ``(P, E)`` and ``(Q, E)``: each embedding L2-normalised, averaged over its
    class, and the mean normalised again (CLIP's own prompt ensembling).

    >>> class_prototypes(torch.tensor([[2.0, 0.0], [0.0, 1.0]]), torch.tensor([[0.0, 3.0]])).tolist()
    [[0.7071067690849304, 0.7071067690849304], [0.0, 1.0]]
    """
    protos = [F.normalize(F.normalize(e.float(), dim=-1).mean(dim=0), dim=-1) for e in (normal, anomalous)]
    return torch.stack(protos)  # (2, E)
