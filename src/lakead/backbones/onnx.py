"""Any ONNX image model as a visual-only backbone, read at a named intermediate tensor.

``--backbone onnx:PATH --layer TENSOR`` reads the output of one node of the graph (for
example ``426_quantized``, a 96 x 14 x 14 block output of the int8 MobileNetV2 of the ONNX
Model Zoo); ``--layer 365_quantized,426_quantized`` reads several. The graph is cut just after
the tensors asked for and run with ONNX Runtime, so the network runs only as deep as needed.
A ``(B, C, H, W)`` feature map becomes ``(B, H * W, C)`` tokens on an ``(H, W)`` grid.

Quantized tensors (int8/uint8, named ``<base>_quantized``) are dequantized with the graph's
own initializers: ``(q - <base>_zero_point) * <base>_scale``.

There is no text tower: the detector turns the text probe off and says so once.

Preprocessing. An ONNX file does not say how its pixels were prepared, so it is read, in
this order, from:

1. the ``preprocessing=`` / ``image_size=`` arguments of :meth:`ONNXBackbone.from_file`;
2. a sidecar JSON file next to the model, ``<model file>.json`` (for example
   ``mobilenetv2-12-int8.onnx.json``)::

       {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
        "resample": "bilinear", "rescale": 0.00392156862745098, "image_size": 224}

   (every key optional; ``resample`` is nearest, bilinear, bicubic or lanczos);
3. otherwise the convention of the ONNX Model Zoo's ImageNet classifiers: RGB scaled to
   0..1, then ImageNet mean (0.485, 0.456, 0.406) and std (0.229, 0.224, 0.225), bilinear
   resize to the model's input size. A log line says when this default is used.

The whole image is resized to the (square) input size, as for CLIP: no centre crop.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import BackboneUnavailableError, ConfigError
from .base import Backbone, BackboneInfo, Features, Layer, LayerInfo, Preprocessing, as_blocks

log = logging.getLogger(__name__)

#: ImageNet statistics, the ONNX Model Zoo's documented preprocessing for its classifiers.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: Input size used when the model's input has no fixed size and nothing else says one.
DEFAULT_IMAGE_SIZE = 224
SIDECAR_SUFFIX = ".json"
QUANTIZED_SUFFIX = "_quantized"

_RESAMPLE = {"nearest": 0, "lanczos": 1, "bilinear": 2, "bicubic": 3}
_SIDECAR_KEYS = {"mean", "std", "resample", "rescale", "image_size"}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_sidecar(path: Path) -> dict[str, Any]:
    """Preprocessing options from a sidecar JSON; ``{}`` when there is none."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path}: cannot be parsed as JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: must hold a JSON object with keys {sorted(_SIDECAR_KEYS)}")
    unknown = sorted(set(data) - _SIDECAR_KEYS)
    if unknown:
        raise ConfigError(f"{path}: unknown keys {unknown}; allowed: {sorted(_SIDECAR_KEYS)}")
    out: dict[str, Any] = {}
    for key in ("mean", "std"):
        if key in data:
            v = data[key]
            if not (isinstance(v, list) and len(v) == 3 and all(isinstance(x, (int, float)) for x in v)):
                raise ConfigError(f"{path}: {key!r} must be a list of 3 numbers, got {v!r}")
            if key == "std" and min(v) <= 0:
                raise ConfigError(f"{path}: 'std' must be positive, got {v!r}")
            out[key] = tuple(float(x) for x in v)
    if "resample" in data:
        r = data["resample"]
        if r not in _RESAMPLE:
            raise ConfigError(f"{path}: 'resample' must be one of {sorted(_RESAMPLE)}, got {r!r}")
        out["resample"] = _RESAMPLE[r]
    if "rescale" in data:
        if not isinstance(data["rescale"], (int, float)) or data["rescale"] <= 0:
            raise ConfigError(f"{path}: 'rescale' must be a positive number, got {data['rescale']!r}")
        out["rescale"] = float(data["rescale"])
    if "image_size" in data:
        s = data["image_size"]
        if isinstance(s, bool) or not isinstance(s, int) or s < 1:
            raise ConfigError(f"{path}: 'image_size' must be a positive integer, got {s!r}")
        out["image_size"] = s
    return out


def _subgraph(model, outputs: Sequence[str]):
    """A copy of ``model`` whose outputs are ``outputs``: just the nodes they depend on."""
    import onnx

    g = model.graph
    producer = {o: n for n in g.node for o in n.output}
    needed, stack, seen = [], list(outputs), set()
    while stack:
        name = stack.pop()
        node = producer.get(name)
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        needed.append(node)
        stack.extend(i for i in node.input if i)
    keep = {id(n) for n in needed}
    nodes = [n for n in g.node if id(n) in keep]  # original (topological) order
    used = {i for n in nodes for i in n.input}
    graph = onnx.helper.make_graph(
        nodes,
        g.name,
        [i for i in g.input if i.name in used],
        [onnx.helper.make_empty_tensor_value_info(o) for o in outputs],
        initializer=[t for t in g.initializer if t.name in used],
    )
    sub = onnx.helper.make_model(graph, opset_imports=model.opset_import, ir_version=model.ir_version)
    sub.graph.value_info.extend(v for v in g.value_info if v.name in used)
    return sub


class ONNXBackbone(Backbone):
    """A frozen ONNX image model read at one named intermediate tensor (visual only)."""

    has_text = False

    def __init__(self, model, *, source: str, fingerprint: str, preprocessing: Preprocessing, image_size: int | None = None) -> None:
        g = model.graph
        initializers = {t.name for t in g.initializer}
        inputs = [i for i in g.input if i.name not in initializers]
        if len(inputs) != 1:
            raise ConfigError(f"{source}: the model has {len(inputs)} inputs {[i.name for i in inputs]}; an image model with one input is needed")
        inp = inputs[0]
        dims = [d.dim_value if d.HasField("dim_value") else None for d in inp.type.tensor_type.shape.dim]
        if len(dims) != 4 or dims[1] != 3:
            raise ConfigError(f"{source}: input {inp.name!r} has shape {dims}; expected (N, 3, H, W) RGB images (NCHW)")
        if inp.type.tensor_type.elem_type != 1:  # onnx.TensorProto.FLOAT
            raise ConfigError(f"{source}: input {inp.name!r} must be float32")
        if dims[2] is not None and dims[3] is not None and dims[2] != dims[3]:
            raise ConfigError(f"{source}: input {inp.name!r} is {dims[2]}x{dims[3]}; only square inputs are supported")
        self.model = model
        self.input_name = inp.name
        self.fixed_size = dims[2]  # None when the height is dynamic
        self.fixed_batch = dims[0]  # None when the batch is dynamic
        self.preprocessing = preprocessing
        self.tensors = [o for n in g.node for o in n.output if o]  # every intermediate, graph order
        self._initializers = {t.name: t for t in g.initializer}
        size = self.fixed_size or image_size or DEFAULT_IMAGE_SIZE
        if self.fixed_size and image_size and image_size != self.fixed_size:
            raise ConfigError(f"{source}: image_size {image_size} asked for, but the model's input is fixed at {self.fixed_size}")
        self.info = BackboneInfo(
            kind="onnx",
            source=source,
            num_layers=0,  # blocks are named tensors
            patch_size=1,  # the stride depends on the tensor read; the grid comes from its shape
            image_size=int(size),
            joint_dim=None,
            fingerprint=fingerprint,
        )
        self.device = torch.device("cpu")
        self._sessions: dict[str, Any] = {}
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._warned_cpu = False
        self._said: set[str] = set()  # layer names said to stand for their _quantized tensor

    @classmethod
    def from_file(
        cls, path: str, *, preprocessing: Preprocessing | None = None, image_size: int | None = None
    ) -> "ONNXBackbone":
        """Load ``path``; preprocessing from the arguments, the sidecar, or the ImageNet default
        (see the module docstring)."""
        import onnx

        p = Path(path).expanduser()
        if not str(path).strip():
            raise BackboneUnavailableError("onnx: needs a file path, e.g. onnx:./mobilenetv2-12-int8.onnx")
        if not p.is_file():
            raise BackboneUnavailableError(f"{p}: no such ONNX file" + (" (it is a directory)" if p.is_dir() else ""))
        try:
            model = onnx.load(str(p))
        except Exception as exc:  # onnx raises DecodeError, ValueError, ... on a bad file
            raise BackboneUnavailableError(f"{p}: not a readable ONNX model ({type(exc).__name__}: {exc})") from None
        p = p.resolve()
        sidecar_path = p.with_name(p.name + SIDECAR_SUFFIX)
        side = read_sidecar(sidecar_path)
        if preprocessing is None:
            if not side:
                log.info(
                    "%s: no %s next to it; using the ONNX Model Zoo's ImageNet preprocessing "
                    "(RGB/255, mean %s, std %s, bilinear)", p.name, sidecar_path.name, IMAGENET_MEAN, IMAGENET_STD,
                )
            preprocessing = Preprocessing(
                mean=side.get("mean", IMAGENET_MEAN),
                std=side.get("std", IMAGENET_STD),
                resample=side.get("resample", _RESAMPLE["bilinear"]),
                rescale=side.get("rescale", 1.0 / 255.0),
            )
        return cls(
            model,
            source=f"onnx:{p}",
            fingerprint=_sha256(p),
            preprocessing=preprocessing,
            image_size=image_size or side.get("image_size"),
        )

    # -- tensors --------------------------------------------------------------------------

    def _session(self, names: tuple[str, ...]):
        if names not in self._sessions:
            import onnxruntime as ort

            opts = ort.SessionOptions()
            opts.intra_op_num_threads = max(1, torch.get_num_threads())
            opts.log_severity_level = 3
            providers = ["CPUExecutionProvider"]
            if self.device.type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
                providers.insert(0, "CUDAExecutionProvider")
            try:
                self._sessions[names] = ort.InferenceSession(
                    _subgraph(self.model, names).SerializeToString(), sess_options=opts, providers=providers
                )
            except Exception as exc:  # onnxruntime raises its own exception types
                raise ConfigError(f"{self.info.source}: cannot run the graph up to tensors {list(names)} ({exc})") from None
        return self._sessions[names]

    def _run(self, names: tuple[str, ...], pixels: np.ndarray) -> list[np.ndarray]:
        """Raw values of tensors ``names`` for ``(B, 3, S, S)`` pixels, dequantized, float32."""
        sess = self._session(names)
        try:
            if self.fixed_batch is not None and self.fixed_batch != pixels.shape[0]:
                if self.fixed_batch != 1:
                    raise ConfigError(f"{self.info.source}: the model's batch size is fixed at {self.fixed_batch}")
                runs = [sess.run(list(names), {self.input_name: pixels[i : i + 1]}) for i in range(pixels.shape[0])]
                outs = [np.concatenate([r[j] for r in runs]) for j in range(len(names))]
            else:
                outs = sess.run(list(names), {self.input_name: pixels})
        except ConfigError:
            raise
        except Exception as exc:
            raise ConfigError(f"{self.info.source}: running up to tensors {list(names)} failed on input {tuple(pixels.shape)} ({exc})") from None
        return [self._dequantize(n, o) for n, o in zip(names, outs)]

    def _dequantize(self, name: str, values: np.ndarray) -> np.ndarray:
        if np.issubdtype(values.dtype, np.floating):
            return values.astype(np.float32, copy=False)
        scale, zp = self.dequantization(name, values.dtype)
        return ((values.astype(np.float32) - zp) * scale).astype(np.float32)

    def dequantization(self, name: str, dtype: Any = np.uint8) -> tuple[np.ndarray, np.ndarray]:
        """``(scale, zero_point)`` float32 of an integer tensor ``name`` of the graph, from its
        ``<base>_scale`` / ``<base>_zero_point`` initializers, shaped to broadcast over
        ``(B, C, H, W)``; the float value is ``(q - zero_point) * scale``."""
        from onnx import numpy_helper

        base = name[: -len(QUANTIZED_SUFFIX)] if name.endswith(QUANTIZED_SUFFIX) else name
        scale_t = self._initializers.get(f"{base}_scale")
        zp_t = self._initializers.get(f"{base}_zero_point")
        if scale_t is None:
            raise ConfigError(
                f"{self.info.source}: tensor {name!r} holds {np.dtype(dtype)} values but the graph has no "
                f"{base}_scale initializer to dequantize it; choose a float tensor"
            )
        scale = numpy_helper.to_array(scale_t).astype(np.float32)
        zp = numpy_helper.to_array(zp_t).astype(np.float32) if zp_t is not None else np.zeros((), np.float32)
        if scale.ndim == 1 and scale.size > 1:  # per-channel: along axis 1 of (B, C, H, W)
            scale = scale.reshape(1, -1, 1, 1)
            zp = zp.reshape(1, -1, 1, 1) if zp.ndim else zp
        return scale, zp

    def subgraph(self, names: Sequence[str]):
        """The ONNX model cut just after tensors ``names`` (its outputs, raw: quantized ones stay integers)."""
        return _subgraph(self.model, tuple(names))

    def feature_maps(self) -> dict[str, tuple[int, ...]]:
        """Every intermediate tensor of shape ``(1, C, H, W)``, with its ``(C, H, W)``, from
        one run on a blank image (used to list valid layer names)."""
        if not self._shapes:
            import onnx
            import onnxruntime as ort

            m = onnx.ModelProto()
            m.CopyFrom(self.model)
            existing = {o.name for o in m.graph.output}
            m.graph.output.extend(onnx.helper.make_empty_tensor_value_info(t) for t in self.tensors if t not in existing)
            opts = ort.SessionOptions()
            opts.log_severity_level = 3
            sess = ort.InferenceSession(m.SerializeToString(), sess_options=opts, providers=["CPUExecutionProvider"])
            size = self.info.image_size
            blank = np.zeros((1, 3, size, size), np.float32)
            names = [o.name for o in sess.get_outputs()]
            for n, v in zip(names, sess.run(names, {self.input_name: blank})):
                if np.ndim(v) == 4 and n != self.input_name:
                    self._shapes[n] = tuple(int(x) for x in v.shape[1:])
        return self._shapes

    def resolve_layer(self, layer: Layer | None, *, semantic: bool = False) -> str:
        """A tensor name of the graph, exactly as given. A block number such as ``382`` (how the
        command line reads digits) names the tensor ``382``. A name that is no tensor but whose
        ``<name>_quantized`` is (the int8 output of node ``<name>``) reads that one, and a log
        line says so: a name never stands for another tensor silently."""
        if semantic:
            raise ConfigError(f"backbone {self.info.source!r} has no text tower: there is no semantic layer")
        if layer is None:
            raise ConfigError(self._layer_help("an ONNX backbone needs --layer TENSOR_NAME (layer=...)"))
        name = str(layer).strip()
        if name in self.tensors:
            chosen = name
        elif name + QUANTIZED_SUFFIX in self.tensors:
            chosen = name + QUANTIZED_SUFFIX
            if name not in self._said:  # once per name
                self._said.add(name)
                log.info("layer %s: %s has no tensor %r; reading %r, its int8 output, dequantized", name,
                         self.info.source, name, chosen)
        else:
            raise ConfigError(self._layer_help(f"layer {layer!r} is not a tensor of {self.info.source}"))
        shapes = self.feature_maps()
        if chosen not in shapes:
            raise ConfigError(self._layer_help(f"tensor {chosen!r} is not a (B, C, H, W) feature map"))
        return chosen

    def layers(self) -> list[LayerInfo]:
        """Every tensor of the graph that ``--layer`` can read (a ``(B, C, H, W)`` feature map),
        in graph order, with its channels and grid at the model's input size."""
        shapes = self.feature_maps()
        out = []
        for n in self.tensors:
            if n not in shapes:
                continue
            c, h, w = shapes[n]
            base = n.removesuffix(QUANTIZED_SUFFIX)
            note = ""
            if base != n:
                note = "int8, read dequantized" + (f"; --layer {base} also names it" if base not in self.tensors else "")
            out.append(LayerInfo(n, c, (h, w), note))
        return out

    def _layer_help(self, problem: str, limit: int = 12) -> str:
        shapes = self.feature_maps()
        maps = [n for n in self.tensors if n in shapes and shapes[n][1] * shapes[n][2] > 1]
        # the deepest maps first: the useful blocks are usually near the end
        listed = ", ".join(f"{n} ({'x'.join(map(str, shapes[n]))})" for n in maps[::-1][:limit])
        more = f" and {len(maps) - limit} more" if len(maps) > limit else ""
        return (f"{problem}; feature maps (C x H x W) of this model, deepest first: {listed}{more}. "
                f"All {len(shapes)} with their grids: lakead layers {self.info.source}")

    def check_image_size(self, image_size: int) -> int:
        if self.fixed_size is not None and image_size != self.fixed_size:
            raise ConfigError(f"image_size {image_size}: the ONNX model {self.info.source} takes only {self.fixed_size} x {self.fixed_size} inputs")
        if image_size < 1:
            raise ConfigError(f"image_size must be positive, got {image_size}")
        return image_size

    def grid_size(self, image_size: int) -> tuple[int, int]:
        raise ConfigError("the grid of an ONNX backbone depends on the tensor read; it comes from extract()")

    # -- run ------------------------------------------------------------------------------

    def extract(self, pixels: torch.Tensor, blocks: Sequence[Layer], joint_block: Layer | None = None) -> Features:
        """``(B, 3, S, S)`` pixels -> tokens ``(B, H * W, C)`` of each tensor in ``blocks``; no joint tokens."""
        if joint_block is not None:
            raise ConfigError(f"backbone {self.info.source!r} has no text tower: there is no semantic layer")
        blocks = as_blocks(blocks)
        names = tuple(str(b) for b in blocks)
        x = pixels.detach().to("cpu", torch.float32).contiguous().numpy()
        feats, grids = {}, {}
        for block, name, fmap in zip(blocks, names, self._run(names, x)):  # (B, C, H, W) each
            if fmap.ndim != 4:
                raise ConfigError(f"{self.info.source}: tensor {name!r} has shape {fmap.shape}, not (B, C, H, W)")
            b, c, h, w = fmap.shape
            feats[block] = torch.from_numpy(np.ascontiguousarray(fmap.reshape(b, c, h * w).transpose(0, 2, 1)))  # (B, H*W, C)
            grids[block] = (h, w)
        return Features(blocks=feats, grids=grids)

    def text_embeddings(self, prompts: Sequence[str]) -> torch.Tensor:
        raise ConfigError(f"backbone {self.info.source!r} is an ONNX image model without a text tower")

    def to(self, device: torch.device | str) -> "ONNXBackbone":
        dev = torch.device(device)
        if dev.type == "cuda":
            import onnxruntime as ort

            if "CUDAExecutionProvider" not in ort.get_available_providers() and not self._warned_cpu:
                log.warning("onnxruntime has no CUDA provider here: the ONNX backbone runs on the CPU")
                self._warned_cpu = True
        if dev != self.device:
            self._sessions.clear()
        self.device = dev
        return self
