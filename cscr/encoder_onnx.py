"""The ONNX Runtime backends of the prompt encoder (``EncoderConfig.backend``: ``onnx``, ``onnx-int8``).

sentence-transformers reaches ONNX Runtime through Optimum (``SentenceTransformer(path,
backend="onnx")``, ``export_dynamic_quantized_onnx_model``), but the Optimum releases on PyPI
(optimum-onnx 0.1, optimum-intel 2.2) require transformers < 4.58 / < 5.6 and fail to import
beside the transformers 5 cscr runs on. The same two steps are taken here with the libraries
Optimum wraps:

* export: the whole sentence-transformers model (transformer, pooling, normalisation) traced
  once with ``torch.onnx.export`` into one graph, token ids + attention mask (+ token types) ->
  sentence embedding, checked against the torch model on a few texts before it is kept;
* int8: ONNX Runtime's dynamic quantisation of that graph (``quantize_dynamic``), with the
  settings of sentence-transformers' ``export_dynamic_quantized_onnx_model(model, "avx512_vnni")``
  (int8 weights, symmetric, per output channel; activations quantised per batch at run time)
  but on the MatMuls only: the word-embedding table (a Gather) stays float32. A lookup gains no
  speed from int8, and on RouterBench validation (222 prompts, one trained head, torch vs int8
  embeddings; issue 13) AUDC moved by -0.0025 with it quantised, +0.0005 without.

Dynamic quantisation takes one activation scale per call (per tensor), so texts run in one
batch change each other's int8 vectors (cosine between a prompt embedded alone and in a batch of
64: down to 0.994 on RouterBench). The int8 backend therefore runs each text (each window) alone:
a vector depends on its text only, as the caches keyed by text require and as serving, one
prompt at a time, needs to reproduce training's vectors. The float32 graph batches as torch does.

Both files are made from the model's local weights (nothing is downloaded), once, in the user
cache, and reused by every later process:

    ~/.cache/cscr/onnx/<model key>/        ($CSCR_CACHE_DIR/onnx)
      model.onnx  model_int8.onnx  export.json (inputs, recipe, versions, check cosines)

The folder appears whole or not at all: it is written beside its place and renamed into it;
of two processes exporting at once, the first rename wins and the other uses its files.
Tokenisation stays sentence-transformers' own (``SentenceTransformer.preprocess``), so the
windows, truncation and padding are the torch backend's; only the forward pass changes. The
recipe is part of the encoder id (``RECIPE``): vectors of another recipe never share a cache.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from cscr.atomic import default_mode
from cscr.config import ConfigError

#: what the export and quantisation do; part of the encoder id and of the export folder's key
RECIPE = "st-graph-opset17+ort-dynamic-qint8-per-channel-matmul+int8-one-text-per-call"
FILES = {"onnx": "model.onnx", "onnx-int8": "model_int8.onnx"}
OUTPUT = "sentence_embedding"
#: texts the export is checked on (padding, a one-text batch, a prompt cut at the window)
CHECK_TEXTS = ("What is the capital of France?", "Write a Python function that reverses a list.",
               "Solve for x: 3x + 5 = 20. " * 60)
MIN_COSINE = 0.9999  # the float32 graph against torch, on CHECK_TEXTS


def require_runtime(backend: str) -> None:
    """Clear error when onnxruntime or onnx is missing."""
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError as exc:
        raise ConfigError(f"encoder backend {backend!r} needs onnxruntime and onnx ({exc}): "
                          "pip install 'cscr[onnx]' (or use backend 'torch')") from exc


def export_key(name: str, model_digest: str) -> str:
    """The export folder's name: the model's name and a hash of its files and of ``RECIPE``."""
    slug = name.rstrip("/").split("/")[-1].replace(" ", "_") or "encoder"
    digest = hashlib.sha256(f"{model_digest}\x1f{RECIPE}".encode()).hexdigest()
    return f"{slug}-{digest[:12]}"


def export_folder(model: Any, key: str, cache_root: Path) -> Path:
    """``cache_root/onnx/<key>``, exported from ``model`` (a SentenceTransformer on the CPU) when
    it is not there yet."""
    folder = cache_root / "onnx" / key
    if (folder / "export.json").exists():
        return folder
    if folder.exists():
        raise FileNotFoundError(f"{folder} is an incomplete ONNX export (no export.json): remove it")
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=folder.parent))
    try:
        _export(model, tmp)
        os.chmod(tmp, default_mode(folder=True))
        try:
            tmp.rename(folder)
        except OSError:
            if not (folder / "export.json").exists():
                raise
            # another process exported first: its files are the same recipe on the same weights
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _export(model: Any, out: Path) -> None:
    """model.onnx, model_int8.onnx and export.json into ``out``."""
    import onnxruntime
    import torch
    from onnxruntime.quantization import QuantType, quantize_dynamic

    feats = model.preprocess(["a", "a longer second text, so that the traced batch is padded"])
    names = [k for k, v in feats.items() if isinstance(v, torch.Tensor)]

    class Graph(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.st = model

        def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
            return self.st(dict(zip(names, tensors, strict=True)))[OUTPUT]

    t0 = time.perf_counter()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings: shapes that are graph inputs at run time
        torch.onnx.export(Graph().eval(), tuple(feats[k] for k in names), str(out / FILES["onnx"]),
                          input_names=names, output_names=[OUTPUT], opset_version=17, dynamo=False,
                          dynamic_axes={**{k: {0: "batch", 1: "tokens"} for k in names}, OUTPUT: {0: "batch"}})
    quiet = logging.getLogger().level
    logging.getLogger().setLevel(logging.ERROR)  # quantize_dynamic's advice to pre-process first
    try:
        quantize_dynamic(out / FILES["onnx"], out / FILES["onnx-int8"], weight_type=QuantType.QInt8,
                         per_channel=True, reduce_range=False, op_types_to_quantize=["MatMul"])
    finally:
        logging.getLogger().setLevel(quiet)
    with torch.inference_mode():
        ref = model.encode(list(CHECK_TEXTS), convert_to_numpy=True, normalize_embeddings=True)
    cosines = {}
    for backend in FILES:
        vecs = OnnxForward(out, backend, inputs=names)(model, list(CHECK_TEXTS), batch_size=2)
        cosines[backend] = float(np.min(np.sum(_unit(vecs) * ref, axis=1)))
    if cosines["onnx"] < MIN_COSINE:
        raise RuntimeError(f"the ONNX export disagrees with the torch model (cosine {cosines['onnx']:.6f} < "
                           f"{MIN_COSINE}): this model does not trace; use encoder backend 'torch'")
    (out / "export.json").write_text(json.dumps({
        "inputs": names, "output": OUTPUT, "recipe": RECIPE, "files": FILES,
        "min_cosine_to_torch": cosines, "seconds": round(time.perf_counter() - t0, 2),
        "versions": {"torch": torch.__version__, "onnxruntime": onnxruntime.__version__},
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }, indent=2))


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


class OnnxForward:
    """An ONNX Runtime session on one exported file: ``(model, texts, batch_size) -> (n, d)``
    float32 rows, the texts tokenised by ``model`` (the SentenceTransformer the file came from);
    int8: one text per call (see the module's docstring). Threads: torch's count
    (``torch.set_num_threads`` governs both backends)."""

    def __init__(self, folder: Path, backend: str, device: str = "cpu", inputs: list[str] | None = None) -> None:
        import onnxruntime as ort
        import torch

        self.path = folder / FILES[backend]
        self.alone = backend == "onnx-int8"  # per-call activation scales: one text per call
        self.inputs = inputs or json.loads((folder / "export.json").read_text())["inputs"]
        if device.startswith("cuda"):
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise ConfigError(f"encoder backend {backend!r} on {device!r} needs onnxruntime-gpu (this "
                                  f"onnxruntime has {ort.get_available_providers()}): use device 'cpu' or "
                                  "backend 'torch'")
            providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
        elif device == "cpu":
            providers = ["CPUExecutionProvider"]
        else:
            raise ConfigError(f"encoder backend {backend!r} runs on 'cpu' or 'cuda', not {device!r}")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = torch.get_num_threads()
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        self.session = ort.InferenceSession(str(self.path), opts, providers=providers)

    def __call__(self, model: Any, texts: list[str], batch_size: int) -> np.ndarray:
        order = np.argsort([-len(t) for t in texts], kind="stable")  # similar lengths per batch
        batch_size = 1 if self.alone else batch_size
        out: np.ndarray | None = None
        for start in range(0, len(texts), batch_size):
            idx = order[start : start + batch_size]
            feats = model.preprocess([texts[i] for i in idx])
            vecs = self.session.run([OUTPUT], {k: feats[k].numpy() for k in self.inputs})[0]
            if out is None:
                out = np.empty((len(texts), vecs.shape[1]), dtype=np.float32)
            out[idx] = vecs
        return out if out is not None else np.zeros((0, 0), dtype=np.float32)
