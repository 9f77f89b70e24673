"""Hugging Face model directories: lazy per-tensor reading, streaming sharded atomic writing, and the live-model bridge.

A model directory holds config.json, the weights as `model.safetensors` or shards listed in `model.safetensors.index.json`,
and optionally tokenizer files. Tensors are read one at a time (headers are parsed up front, data only on `get`), and written
shard by shard, so neither side ever holds a whole model in memory.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import uuid
from collections import Counter
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from evomerge.chat_templates import NAMED_CHAT_TEMPLATES
from evomerge.errors import EvomergeError
from evomerge.models.architectures import Architecture, architecture_for
from evomerge.paths import HUB_ID
from evomerge.recipe import Recipe

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
# what a written model takes from the model whose tokenizer it ships: the tokenizer, an image-text model's image and video
# processors (AutoProcessor needs them to take images), the generation settings
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model", "vocab.json",
                   "merges.txt", "vocab.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json",
                   "preprocessor_config.json", "processor_config.json", "video_preprocessor_config.json",
                   "generation_config.json")
VOCAB_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt")
_HUB_PATTERNS = ["*.safetensors", "*.json", "*.txt", "*.jinja", "tokenizer.model"]
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


COMPUTE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}


def parse_dtype(name: str | None, *, source: str | None = None, key: str = "dtype") -> torch.dtype | None:
    """A compute dtype named in a recipe or experiment (None: the models' own)."""
    if name is None:
        return None
    if name not in COMPUTE_DTYPES:
        raise EvomergeError(f"unknown dtype {name!r} (one of {', '.join(COMPUTE_DTYPES)})", source=source, key=key)
    return COMPUTE_DTYPES[name]


def check_device(device: str, *, source: str | None = None, key: str = "--device") -> None:
    """The device exists on this machine: a bad name, a backend torch lacks here, or an index past the device count
    is a user error naming `key`, not a traceback from deep in a merge or an evaluation."""
    try:
        kind = torch.device(device)
    except (RuntimeError, TypeError):
        raise EvomergeError(f"not a device: {device!r} (examples: cpu, cuda, cuda:1)", source=source, key=key) from None
    if kind.type == "cpu":
        return
    backend = torch.backends.mps if kind.type == "mps" else getattr(torch, kind.type, None)
    if backend is None or not backend.is_available():
        build = f"torch {torch.__version__}" + (f", CUDA {torch.version.cuda}" if kind.type == "cuda" else "")
        raise EvomergeError(f"device {device!r} is not available on this machine ({build}); use cpu, or run where "
                            f"{kind.type} is", source=source, key=key)
    count = backend.device_count() if hasattr(backend, "device_count") else 1
    if kind.index is not None and kind.index >= count:
        raise EvomergeError(f"device {device!r} does not exist: this machine has {count} {kind.type} device(s)",
                            source=source, key=key)


def read_header(file: Path, fail=None, *, whole: bool = True) -> dict[str, dict]:
    """A safetensors header: {name: {dtype, shape, data_offsets}}, in the order the data lies in the file. With
    `whole`, a file shorter than its header says (an interrupted download or copy) is refused here, before any tensor
    is read. `fail`: makes the error (`model_failure`); by default it names the file's dir."""
    try:
        with open(file, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(size))
        header.pop("__metadata__", None)
        data = max((entry["data_offsets"][1] for entry in header.values()), default=0)
        if whole and file.stat().st_size < 8 + size + data:
            raise ValueError(f"truncated: {8 + size + data} bytes by its header, {file.stat().st_size} on disk")
        return dict(sorted(header.items(), key=lambda item: item[1]["data_offsets"][0]))
    except (OSError, ValueError, struct.error, KeyError, TypeError, IndexError) as err:
        raise (fail or model_failure(file.parent, None))(f"unreadable safetensors file {file.name} ({err})") from None


def load_failure(err: Exception) -> str:
    """`Type: first line` of an exception transformers raised reading a model's files (OSError, ValueError, KeyError,
    TypeError, ... for a missing or bad file), for a one-line error."""
    return f"{type(err).__name__}: {(str(err).strip().splitlines() or [''])[0][:300]}"


def _refuse_quantized(config: dict, header: dict[str, dict], fail) -> None:
    """A merge averages weights, which a quantized checkpoint (GPTQ, AWQ, bitsandbytes, FP8 with block scales) holds
    packed or scaled: merged as they are they give a wrong model without an error. One whose config.json has a
    quantization_config and whose tensors are not all floating point is refused (a stale quantization_config over
    float weights, as a dequantized QLoRA merge may leave, is not)."""
    quantization = config.get("quantization_config")
    if not isinstance(quantization, dict):
        return
    packed = [name for name, entry in header.items() if entry.get("dtype") not in ("F64", "F32", "F16", "BF16")]
    if packed:
        method = quantization.get("quant_method", "quantization_config")
        raise fail(f"a quantized checkpoint ({method}: {packed[0]} is {header[packed[0]]['dtype']}); merging needs "
                   "its full-precision weights")


def resolve_model(ref: str, source: str | None = None) -> Path:
    """A local directory, or a hub snapshot when `ref` is not a local path but looks like a repo id. `source`: the
    file that names `ref` (errors name both)."""
    if not on_hub(ref):
        return Path(ref).expanduser()
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(**hub_repo(ref), allow_patterns=_HUB_PATTERNS))
    except Exception as err:  # offline, unknown or gated repo, network: all mean "cannot get this model"
        raise _hub_error(ref, err, source) from None


def on_hub(ref: str) -> bool:
    """Whether `ref` names a Hugging Face Hub repo: no local path, and a repo id (`org/name`, `org/name@revision`)."""
    return not Path(ref).expanduser().exists() and HUB_ID.fullmatch(ref) is not None


def hub_repo(ref: str) -> dict[str, str | None]:
    """huggingface_hub's repo_id and revision of `org/name` (the default branch) or `org/name@revision`."""
    repo_id, _, revision = ref.partition("@")
    return {"repo_id": repo_id, "revision": revision or None}


def _hub_error(ref: str, err: Exception, source: str | None) -> EvomergeError:
    reason = str(err).strip().splitlines()[0] if str(err).strip() else ""
    return model_failure(Path(ref), source)(f"no such directory, and fetching it from the Hugging Face Hub failed "
                                       f"({type(err).__name__}: {reason})")


def _hub_headers(repo: str, source: str | None) -> tuple[Path, dict[str, str], dict[str, dict]]:
    """(the local dir holding the repo's config.json, tensor name -> shard file, safetensors header entries in the
    order their data lies) of a hub repo, fetched without its weights."""
    from huggingface_hub import get_safetensors_metadata, hf_hub_download

    try:
        path = Path(hf_hub_download(**hub_repo(repo), filename="config.json")).parent
        metadata = get_safetensors_metadata(**hub_repo(repo))
    except Exception as err:  # offline, unknown or gated repo, no safetensors weights, network
        raise _hub_error(repo, err, source) from None
    shards, header = {}, {}
    for shard, file_metadata in sorted(metadata.files_metadata.items()):
        for name, info in sorted(file_metadata.tensors.items(), key=lambda item: item[1].data_offsets[0]):
            shards[name] = shard
            header[name] = {"dtype": info.dtype, "shape": list(info.shape), "data_offsets": list(info.data_offsets)}
    return path, shards, header


def model_failure(path: Path, source: str | None):
    """The error for a problem with the model at `path`, named by `source` when a file names the model."""
    def fail(message: str) -> EvomergeError:
        return EvomergeError(f"{path}: {message}", source=source) if source else EvomergeError(message, source=str(path))
    return fail


def _read_config(path: Path, fail) -> tuple[dict, Architecture]:
    try:
        config = json.loads((path / "config.json").read_text())
    except FileNotFoundError:
        raise fail("no config.json in the model directory") from None
    except (OSError, ValueError) as err:
        raise fail(f"unreadable config.json ({err})") from None
    if not isinstance(config, dict):
        raise fail("config.json is not a JSON object")
    arch = architecture_for(config, source=str(path / "config.json"))
    try:
        arch.num_layers(config)
    except EvomergeError as err:
        raise EvomergeError(str(err), source=str(path / "config.json")) from None
    return config, arch


class ModelDir:
    """A model directory read lazily: headers now, each tensor's data when asked for."""

    def __init__(self, path: Path, config: dict, arch: Architecture, files: dict[str, Path], header: dict[str, dict]):
        self.path, self.config, self.arch = path, config, arch
        self._files, self._header = files, header  # tensor name -> shard file, header entry
        self._handles: dict[Path, object] = {}
        self.tensor_names: list[str] = list(header)

    @classmethod
    def open(cls, ref: str | os.PathLike, *, source: str | None = None, headers_only: bool = False) -> "ModelDir":
        """`source` is the file that names this model (a recipe, a config); errors then name both. `headers_only`: a
        hub repo not on disk is opened from its config.json and safetensors headers (ranged reads; what planning
        needs), without downloading its weights: `get` then has no data to read. A local dir's safetensors files
        may then be headers alone (what `evomerge plan` reads)."""
        from evomerge.models.lora import AdaptedModelDir, split_reference

        if pair := split_reference(str(ref)):  # mergekit's model+adapter: a LoRA adapter applied to the model
            return AdaptedModelDir.open_adapted(*pair, source=source, headers_only=headers_only)
        if headers_only and on_hub(str(ref)):
            path, shards, header = _hub_headers(str(ref), source)
            config, arch = _read_config(path, model_failure(path, source))
            files = {name: path / shards[name] for name in header}
            _refuse_quantized(config, header, model_failure(path, source))
            return cls(path, config, arch, files, header)
        path = resolve_model(str(ref), source)
        fail = model_failure(path, source)
        if not path.is_dir():
            raise fail("no such model directory")
        config, arch = _read_config(path, fail)

        if (path / INDEX).is_file():
            try:
                weight_map = json.loads((path / INDEX).read_text())["weight_map"]
            except (OSError, ValueError, KeyError, TypeError) as err:
                raise fail(f"unreadable {INDEX} ({type(err).__name__}: {err})") from None
            shards = sorted(set(weight_map.values()))
        elif (path / SINGLE).is_file():
            weight_map, shards = None, [SINGLE]
        else:
            hint = " (only PyTorch .bin weights: convert them to safetensors)" if any(path.glob("*.bin")) else ""
            raise fail(f"no {SINGLE} or {INDEX} in the model directory{hint}")

        files, header = {}, {}
        for shard in shards:
            if not (path / shard).is_file():
                raise fail(f"{INDEX} names shard {shard}, which is missing")
            entries = read_header(path / shard, fail, whole=not headers_only)
            header.update(entries)
            files.update(dict.fromkeys(entries, path / shard))
        for name, shard in (weight_map or {}).items():
            if files.get(name) != path / shard:
                raise fail(f"{INDEX} puts tensor {name} in {shard}, which does not hold it")
        _refuse_quantized(config, header, fail)
        return cls(path, config, arch, files, header)

    @property
    def num_layers(self) -> int:
        return self.arch.num_layers(self.config)

    def layer_tensor_names(self, layer: int) -> list[str]:
        return [n for n in self.tensor_names if self.arch.layer_of(n) == layer]

    @property
    def past_layers(self) -> list[str]:
        """Tensors of layers numbered past num_layers: a multi-token-prediction layer (GLM-4.5, DeepSeek-V3), which
        follows the layers and which transformers does not load."""
        n = self.num_layers
        return [name for name in self.tensor_names if (self.arch.layer_of(name) or 0) >= n]

    def drop_unloaded(self) -> "ModelDir":
        """Leaves out the tensors transformers does not load (multi-token-prediction heads: Qwen3.5's `mtp.`, the layers
        past the last): what a search's live models hold, its workers read and its plan sizes."""
        past = set(self.past_layers)
        self.tensor_names = [n for n in self.tensor_names if not self.arch.is_unloaded(n) and n not in past]
        return self

    @property
    def has_tokenizer(self) -> bool:
        return any((self.path / f).is_file() for f in VOCAB_FILES)

    def __contains__(self, name: str) -> bool:
        return name in self._header

    def _entry(self, name: str) -> dict:
        if name not in self._header:
            raise EvomergeError(f"no tensor named {name!r}", source=str(self.path))
        return self._header[name]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._entry(name)["shape"])

    def dtype(self, name: str) -> torch.dtype:
        return _DTYPES[self._entry(name)["dtype"]]

    def get(self, name: str, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> torch.Tensor:
        self._entry(name)
        file = self._files[name]
        if file not in self._handles:
            self._handles[file] = safe_open(file, framework="pt", device="cpu")
        return self._handles[file].get_tensor(name).to(device=device, dtype=dtype)

    def close(self) -> None:
        self._handles.clear()  # dropping the handles unmaps the files

    def __enter__(self) -> "ModelDir":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __getstate__(self) -> dict:  # picklable (Ray): open handles stay behind
        return {**self.__dict__, "_handles": {}}

    def __repr__(self) -> str:
        return f"ModelDir({str(self.path)!r}, {self.arch.name}, {self.num_layers} layers)"


def common_dtype(dirs) -> torch.dtype | None:
    """The floating dtype every tensor of `dirs` (ModelDirs) has; float32 when they differ (float64 if one is float64),
    so that no value is rounded; None when no tensor is floating."""
    found = {d.dtype(n) for d in dirs for n in d.tensor_names if d.dtype(n).is_floating_point}
    if len(found) <= 1:
        return next(iter(found), None)
    return torch.float64 if torch.float64 in found else torch.float32


def check_finite(model_dir: ModelDir | str | os.PathLike) -> list[str]:
    """Names of the floating-point tensors holding a NaN or an infinity, read one tensor at a time."""
    md = model_dir if isinstance(model_dir, ModelDir) else ModelDir.open(model_dir)
    bad = []
    for name in md.tensor_names:
        t = md.get(name)
        if t.is_floating_point() and not torch.isfinite(t).all():
            bad.append(name)
    return bad


class ModelWriter:
    """Writes a model directory atomically: into a temp directory beside `out_dir`, renamed into place only on success.

        with ModelWriter(out) as w:
            for name in names: w.add(name, tensor)
            w.write_config(config); w.copy_tokenizer(src)

    Tensors are copied to CPU on `add` and written as soon as a shard fills, so at most one shard is held in memory.
    """

    def __init__(self, out_dir: str | os.PathLike, *, max_shard_bytes: int = 5 * 10**9, force: bool = False):
        self.out_dir, self.max_shard_bytes, self.force = Path(out_dir), max_shard_bytes, force
        self._tmp: Path | None = None
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._shards: list[list[str]] = []  # tensor names per written shard
        self.total_size = 0

    def __enter__(self) -> "ModelWriter":
        out = self.out_dir
        if out.exists() and not self.force and (not out.is_dir() or any(out.iterdir())):
            raise EvomergeError("output directory exists and is not empty (use --force to replace it)", source=str(out))
        out.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
        self._tmp.mkdir()
        return self

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if self._tmp is None:
            raise RuntimeError("ModelWriter.add outside its `with` block")
        if name in self._pending or any(name in shard for shard in self._shards):
            raise ValueError(f"tensor {name!r} added twice")
        t = tensor.detach().to("cpu", copy=True).contiguous()  # a copy: the caller may change its tensor afterwards
        nbytes = t.numel() * t.element_size()
        if self._pending and self._pending_bytes + nbytes > self.max_shard_bytes:
            self._flush()
        self._pending[name] = t
        self._pending_bytes += nbytes
        self.total_size += nbytes

    def _flush(self) -> None:
        save_file(self._pending, self._tmp / f"shard-{len(self._shards)}.safetensors", metadata={"format": "pt"})
        self._shards.append(list(self._pending))
        self._pending, self._pending_bytes = {}, 0

    def write_config(self, config: dict) -> None:
        self.write_text("config.json", json.dumps(config, indent=2, sort_keys=True) + "\n")

    def write_text(self, name: str, text: str) -> None:
        (self._tmp / name).write_text(text)

    def copy_tokenizer(self, model_dir: ModelDir | str | os.PathLike) -> list[str]:
        """Copies the TOKENIZER_FILES present in `model_dir`; returns their names."""
        src = model_dir.path if isinstance(model_dir, ModelDir) else Path(model_dir)
        copied = [f for f in TOKENIZER_FILES if (src / f).is_file()]
        for f in copied:
            shutil.copyfile(src / f, self._tmp / f)
        return copied

    def save_tokenizer(self, tokenizer) -> None:
        """A transformers tokenizer built in memory (a union of vocabularies), over the files copied before."""
        tokenizer.save_pretrained(str(self._tmp))

    def set_chat_template(self, template: str) -> None:
        """The template as chat_template.jinja (what transformers >= 4.47 reads first) and in tokenizer_config.json
        (what older versions read)."""
        self.write_text("chat_template.jinja", template)
        config_file = self._tmp / "tokenizer_config.json"
        if config_file.is_file():
            config = tokenizer_config(config_file)
            config_file.write_text(json.dumps({**config, "chat_template": template}, indent=2, ensure_ascii=False) + "\n")

    def _finish(self) -> None:
        if self._pending:
            self._flush()
        n = len(self._shards)
        names = [SINGLE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        for i, final in enumerate(names):
            os.replace(self._tmp / f"shard-{i}.safetensors", self._tmp / final)
        if n > 1:
            weight_map = {t: final for final, shard in zip(names, self._shards) for t in shard}
            index = {"metadata": {"total_size": self.total_size}, "weight_map": dict(sorted(weight_map.items()))}
            self.write_text(INDEX, json.dumps(index, indent=2) + "\n")
        if self.out_dir.exists():  # --force: move the old one aside, put the new one in place, then delete the old
            old = self.out_dir.parent / f".{self.out_dir.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(self.out_dir, old)
            os.replace(self._tmp, self.out_dir)
            shutil.rmtree(old) if old.is_dir() else old.unlink()
        else:
            os.replace(self._tmp, self.out_dir)

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                self._finish()
        finally:
            if self._tmp.exists():
                shutil.rmtree(self._tmp)
            self._pending = {}


def load_live_model(ref: ModelDir | str | os.PathLike, device: str | torch.device = "cpu",
                    dtype: torch.dtype | str | None = None):
    """A transformers causal LM in eval mode; `dtype=None` keeps the checkpoint's dtype."""
    md = ref if isinstance(ref, ModelDir) else ModelDir.open(ref)
    model = load_causal_lm(md.path, dtype or "auto")
    with torch.no_grad():  # a model+adapter: the adapted weights over the base's (models/lora.py)
        for name in getattr(md, "adapted_names", []):
            param = live_param(model, name, md.arch)
            param.copy_(md.get(name, dtype=param.dtype))
    return model.to(device).eval()


def load_causal_lm(path: str | os.PathLike, dtype: torch.dtype | str | None = None):
    """AutoModelForCausalLM.from_pretrained(path) without transformers' "Loading weights" bar (a worker loads several
    models; `evomerge eval` prints a table line per model). An image-text model (`...ForConditionalGeneration`) loads
    whole, as its own class: the auto class would load its text model alone (Qwen3.5) or nothing (Mistral-3)."""
    import transformers
    from transformers.utils import logging as hf_logging

    config = transformers.AutoConfig.from_pretrained(str(path))
    declared = (config.architectures or [""])[0]
    image_text = declared.endswith("ForConditionalGeneration") and hasattr(transformers, declared)
    model_class = getattr(transformers, declared) if image_text else transformers.AutoModelForCausalLM
    shown = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model = model_class.from_pretrained(str(path), config=config, dtype=dtype)
    finally:
        if shown:
            hf_logging.enable_progress_bar()
    if model.dtype == torch.float64 and hasattr(model, "set_experts_implementation"):
        model.set_experts_implementation("eager")  # transformers' grouped experts (MoE) take no float64
    return model


def live_param(model: torch.nn.Module, checkpoint_name: str, arch: Architecture | None = None) -> torch.Tensor:
    """The live parameter (or buffer) behind a checkpoint tensor name.

    Checkpoints may or may not carry the base model prefix (GPT-2's `transformer.`), and transformers renames a few
    tensors on load (`arch.live_renames`); a tied lm_head resolves to the embedding Parameter itself, so writing into it
    writes the embeddings, and one expert's tensor to its view of the fused experts (`arch.live_experts`). `arch`
    defaults to the one of `model.config`.
    """
    if arch is None:
        config = {"architectures": model.config.architectures, "model_type": model.config.model_type}
        arch = architecture_for(config, source=type(model).__name__)
    prefix = f"{model.base_model_prefix}."
    for live_name in arch.live_names(checkpoint_name):
        for name in dict.fromkeys((live_name, prefix + live_name, live_name.removeprefix(prefix))):
            for getter in (model.get_parameter, model.get_buffer):
                try:
                    return getter(name)
                except AttributeError:
                    pass
    fused = arch.live_expert(checkpoint_name)
    if fused:  # one expert's tensor inside the live model's fused experts: a view, so writes reach the parameter
        live_name, expert, chunk, chunks = fused
        return live_param(model, live_name, arch)[expert].chunk(chunks)[chunk]
    raise EvomergeError(f"the live {type(model).__name__} has no parameter for checkpoint tensor {checkpoint_name!r}")


def tokenizer_model(recipe: Recipe, default: str, dirs: dict[str, ModelDir], source: str) -> str:
    """The model whose tokenizer a merge gets: `default` (the base), or the recipe's `tokenizer_source`, one of its
    models however its path is spelled (`./m` is `m`). Checked while planning, as the tokenizer is copied last."""
    choice = recipe.merge.tokenizer_source if recipe.merge else None
    if choice in (None, "base", "union"):  # union: the base's tokenizer files, then the union written over them
        return default
    return recipe_model(choice, dirs, source, "tokenizer_source", "; name one of them, 'base' or 'union'")


def recipe_model(choice: str, dirs: dict[str, ModelDir], source: str, key: str, hint: str = "") -> str:
    """The recipe's model that `choice` names, however its path is spelled (`./m` is `m`)."""
    same = [name for name, d in dirs.items() if name == choice or d.path.resolve() == Path(choice).expanduser().resolve()]
    if not same:
        raise EvomergeError(f"{choice!r} is not one of the recipe's models{hint}", source=source, key=key)
    return same[0]


def pick_chat_template(choice: str, dirs: dict[str, ModelDir], target: ModelDir | None = None,
                       source: str | None = None) -> str | None:
    """A recipe's `chat_template`: the template itself, a named one (evomerge/chat_templates.py), or with "auto" the one
    most of the models have (the first of them on a tie; none when no model has one), as mergekit picks it. `target`:
    the model whose tokenizer files the merge copies; the template goes into its tokenizer_config.json, read here so
    that a broken one fails before the merge does."""
    if target is not None and (target.path / "tokenizer_config.json").is_file():
        tokenizer_config(target.path / "tokenizer_config.json", source)
    if choice != "auto":
        return NAMED_CHAT_TEMPLATES.get(choice, choice)
    templates = [t.strip() for t in (chat_template_of(d, source) for d in dirs.values()) if t]
    return Counter(templates).most_common(1)[0][0] if templates else None


def chat_template_of(model_dir: ModelDir, source: str | None = None) -> str | None:
    """A model's chat template where transformers looks for it: chat_template.jinja, else tokenizer_config.json's
    `chat_template` (a string, or named templates: the `default` one)."""
    jinja, config_file = model_dir.path / "chat_template.jinja", model_dir.path / "tokenizer_config.json"
    if jinja.is_file():
        return jinja.read_text()
    template = tokenizer_config(config_file, source).get("chat_template") if config_file.is_file() else None
    if isinstance(template, list):
        template = next((t.get("template") for t in template if t.get("name") == "default"), None)
    return template or None


def tokenizer_config(file: Path, source: str | None = None) -> dict:
    """A tokenizer_config.json's object; an unreadable one is the user's error, named (with `source`, the file that
    names its model)."""
    try:
        config = json.loads(file.read_text())
    except (OSError, ValueError) as err:
        raise model_failure(file, source)(f"unreadable ({err})") from None
    if not isinstance(config, dict):
        raise model_failure(file, source)("not a JSON object")
    return config
