"""What one request may cost the service, decided before it starts: option bounds and a
memory estimate.

- :func:`check_options`: the model options whose work grows without bound with their value
  (the map blur ``sigma``/``blur_sigma``, the HNSW search's ``hnsw_ef_search``, PatchCore's
  ``neighbours``) must stay within the server's limits (:class:`~lakead.serve.uploads.ServeLimits`
  ``max_sigma``, ``max_ef_search``, ``max_neighbours``); ``image_size`` within ``max_image_size``.
  Checked on the options of a model creation (422) and on a stored model before it predicts
  (409: a model written by ``lakead fit`` with options this server does not run).
- :func:`fit_memory` / :func:`predict_memory`: the memory a fit or a prediction will hold,
  estimated from its options, the backbone's token grid and width, and the number and size of
  the images; over ``max_work_memory_mb`` the request is refused (413), the message naming the
  option (or the images) that makes it large. The backbone's own working memory is not counted
  (it depends on the server's batch size and ``max_image_size``, not on a client's options).

The estimate, per support image: its ``N`` tokens (x4 with AnomalyDINO's rotations) times the
channels the method holds for them, in float32, held :data:`COPIES` times (the features, the
bank or gallery, and a working copy: the coreset, the leave-one-out distances):

- LAKE and its variants: ``k`` channels (every channel with ``selection all``), and the
  full-width tokens, streamed within the fit's own memory bound (:data:`LAKE_STREAM_BYTES`);
- PatchCore: ``width`` channels (default: the paper's 1024, or the blocks' summed width);
- AnomalyDINO and the other memory banks: the blocks' summed width;
- WinCLIP: the patch tokens and about three window embeddings per patch.

A prediction holds one batch of such features and the maps of all its images (float32 at each
image's decoded size, :data:`MAP_COPIES` times: the map, its blur and the overlay's colours).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError
from .uploads import ServeLimits, UploadRejected

#: Times the per-image features are held during a fit (features, bank or gallery, working copy).
COPIES = 3
#: What LAKE's streaming fit keeps of full-width tokens (lakead.methods.lake.stream.DEFAULT_FIT_MEMORY).
LAKE_STREAM_BYTES = 256 << 20
#: float32 copies of each image's map a prediction holds (map, blur, overlay colours).
MAP_COPIES = 4
#: Channels assumed for a backbone whose width depends on the block read (ONNX).
UNKNOWN_WIDTH = 1024

#: option -> (the ServeLimits field bounding it, the lakead serve option that sets it)
BOUNDS = {
    "sigma": ("max_sigma", "--max-sigma"),
    "blur_sigma": ("max_sigma", "--max-sigma"),
    "hnsw_ef_search": ("max_ef_search", "--max-ef-search"),
    "neighbours": ("max_neighbours", "--max-neighbours"),
    "image_size": ("max_image_size", "--max-image-size"),
}


class OverLimit(ConfigError):
    """A stored model's option is past what this server runs (answered 409)."""


def check_options(config: Any, limits: ServeLimits, model: str | None = None) -> None:
    """Refuse options past the server's bounds (:data:`BOUNDS`): a :class:`ConfigError` for a
    creation, an :class:`OverLimit` naming the stored ``model``."""
    for name, (field, flag) in BOUNDS.items():
        value = getattr(config, name, None)
        bound = getattr(limits, field)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value > bound:
            if model is None:
                raise ConfigError(f"{name} {value:g} is larger than this service allows ({bound}, lakead serve {flag})")
            raise OverLimit(f"stored model {model!r} has {name} {value:g}, larger than this server runs "
                            f"({bound}, lakead serve {flag})")


@dataclass(frozen=True)
class Estimate:
    bytes: int
    why: str  # what makes it this large, in words
    option: str  # the option to lower (or "images")


def _mib(n: float) -> str:
    return f"{n / 2**20:,.0f} MiB" if n < 2**30 else f"{n / 2**30:.1f} GiB"


def _held(method: str, config: Any, backbone: Any, image_size: int) -> tuple[int, int, str | None]:
    """``(tokens per image, channels held per token, the option the client set that makes
    them many, or None)``."""
    gh, gw = backbone.grid_size(image_size)
    tokens = gh * gw
    width = getattr(backbone, "width", None) or UNKNOWN_WIDTH
    summed = width * len(getattr(config, "blocks", None) or (None,))
    if method.startswith("winclip"):
        return tokens, width + 3 * (backbone.info.joint_dim or width), None
    if getattr(config, "rotations", False):
        return tokens * 4, summed, "rotations"
    if hasattr(config, "coreset") and hasattr(config, "width"):  # PatchCore
        return tokens, config.width or min(1024, summed), "width" if config.width else None
    if hasattr(config, "k") and hasattr(config, "selection"):  # LAKE and its variants
        if config.selection == "all":
            return tokens, summed, "selection"
        if isinstance(config.k, int) and not isinstance(config.k, bool):
            return tokens, min(config.k, summed), "k"
        return tokens, min(backbone.default_k() or 100, summed), None
    return tokens, summed, None


def fit_memory(method: str, config: Any, backbone: Any, n_images: int, batch_size: int) -> Estimate:
    """What fitting ``n_images`` support images with ``config`` will hold (see the module docstring)."""
    size = config.image_size or backbone.info.image_size
    tokens, channels, option = _held(method, config, backbone, size)
    total = (n_images * COPIES + min(batch_size, n_images)) * tokens * channels * 4
    if hasattr(config, "k") and hasattr(config, "selection"):  # the full-width tokens LAKE streams through
        width = (getattr(backbone, "width", None) or UNKNOWN_WIDTH) * len(getattr(config, "blocks", None) or (None,))
        total += min(LAKE_STREAM_BYTES, n_images * tokens * width * 4)
    if option is None:
        option = "image_size" if config.image_size else "images"
    why = (f"{n_images} images x {tokens:,} tokens x {channels:,} channels x 4 bytes, held {COPIES} times; "
           f"image_size {size}")
    return Estimate(int(total), why, option)


def predict_memory(det: Any, n_images: int, pixels: int, batch_size: int) -> Estimate:
    """What scoring ``n_images`` images of ``pixels`` decoded pixels in all with the loaded
    detector ``det`` will hold: a batch of its features and every image's maps."""
    maps = pixels * 4 * MAP_COPIES
    state = getattr(det, "state_", None)
    config = getattr(det, "config", None)
    feats = 0
    if state is not None and config is not None and hasattr(det, "backbone") and hasattr(state, "image_size"):
        tokens, channels, _ = _held(getattr(det, "method", ""), config, det.backbone, int(state.image_size))
        channels = max(channels, int(getattr(state, "width", 0) or 0))
        feats = min(batch_size, n_images) * tokens * channels * 4 * COPIES
    why = f"{n_images} images of {pixels / 1e6:.1f} MP in all, their maps held {MAP_COPIES} times as float32"
    if feats > maps:
        why = f"a batch of features of the model's {getattr(state, 'width', '?')} channels"
    return Estimate(int(maps + feats), why, "images" if maps >= feats else "the model")


def refuse_over(estimate: Estimate, limits: ServeLimits, what: str) -> None:
    """413 when ``estimate`` is over ``max_work_memory_mb``, naming what to lower."""
    budget = limits.max_work_memory_mb * 2**20
    if estimate.bytes <= budget:
        return
    if estimate.option == "images":
        advice = "send fewer or smaller images"
    elif estimate.option == "the model":
        advice = "this model needs more than the server allows per request"
    else:
        advice = f"lower {estimate.option}" if estimate.option != "rotations" else "turn rotations off or send fewer images"
    raise UploadRejected(413, f"this {what} would hold about {_mib(estimate.bytes)} ({estimate.why}), more than this "
                              f"server's budget of {_mib(budget)} per request (lakead serve --max-work-memory-mb): {advice}",
                         [(estimate.option, f"about {_mib(estimate.bytes)} of {_mib(budget)}")])
