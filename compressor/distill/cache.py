"""The teacher computed once: a disk cache of the teacher outputs the distillation losses read.

A distillation (and every pruning recovery or search trial) compares the student with a frozen teacher whose
outputs for a given input never change. :class:`TeacherCache` runs the teacher once per training feature, stores
what the loss reads (the task head's outputs, the hidden states and the attention Q/K/V of the layers a loss
term compares, in fp16 by default) in shard files, and answers later batches from them, so epochs, recovery
steps, search trials and a resumed run read the teacher instead of running it::

    cache = TeacherCache.open(run_dir / "teacher-cache", teacher, max_mb=2048)
    objective = Distillation(student, teacher, kd, teacher_cache=cache)   # compressor.distill.objective
    train_model(student, tokenizer, data, options, seed=0, objective=objective)  # the engine fills it first

Keys: a cache directory belongs to one teacher (a SHA-256 of its weights, head layout and labels, see
:func:`teacher_fingerprint`); below it one folder per set of cached parts (which hidden states and Q/K/V
layers, the dtype); inside, each row is keyed by a hash of the task and the tokenized feature. Shards are
written atomically, so a killed run keeps every finished shard and a resumed one computes only the rest.
The cache is bounded by ``max_mb``: features beyond it (and any batch row it does not hold) are computed by
the teacher on the fly, only those rows.

Rows are stored per feature: head outputs at the width of the batch they were computed in (the positions past
the feature's own length are padding), hidden states and Q/K/V cut to the feature's length. A batch is
assembled by cutting or padding each row to the student's shapes; every position the losses read is a real
token, so the values match an on-the-fly teacher up to the storage dtype and the floating-point order of a
differently padded batch.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from compressor.errors import RecipeError
from compressor.model.multitask import ModelOutput, MultiTaskModel
from compressor.train.pieces import INDEX_KEY  # the engine puts it into batches (re-exported here)

MANIFEST = "teacher.json"
PAD_LOGIT = -1e4  # head outputs past a stored row: padding positions, given no mass (as QA's head masks them)
_DTYPES = {"float16": torch.float16, "float32": torch.float32}


def teacher_fingerprint(teacher: MultiTaskModel) -> str:
    """SHA-256 of the teacher's weights (names, dtypes, shapes, bytes) and its tasks' labels."""
    h = hashlib.sha256()
    for name, tensor in sorted(teacher.state_dict().items()):
        t = tensor.detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    h.update(json.dumps({n: list(p.labels) for n, p in teacher.tasks.items()}, sort_keys=True).encode())
    return h.hexdigest()


def feature_key(task: str, feature: Mapping[str, Any]) -> str:
    """A hash of the task and the tokenized feature (ids, masks, spans, labels...), stable across runs."""
    text = json.dumps(feature, sort_keys=True, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o))
    return hashlib.sha1(f"{task}\n{text}".encode()).hexdigest()


@dataclass(frozen=True)
class Needs:
    """What the loss reads of the teacher: head outputs (always), hidden-state indices (0 = embeddings, i + 1 =
    output of layer i) and the layers whose attention Q/K/V it compares."""

    hidden: tuple[int, ...] = ()
    qkv: tuple[int, ...] = ()

    def names(self, outputs: Iterable[str]) -> list[str]:
        return ([f"out.{k}" for k in outputs] + [f"hidden.{i}" for i in self.hidden]
                + [f"{n}.{layer}" for layer in self.qkv for n in ("query", "key", "value")])

    def signature(self, dtype: str) -> str:
        h = "-".join(map(str, self.hidden)) or "none"
        q = "-".join(map(str, self.qkv)) or "none"
        return f"{dtype}_h{h}_a{q}"


class TeacherCache:
    """One teacher's cached outputs (see the module docstring). Open with :meth:`open`.

    Attributes:
        stats: ``built`` rows the teacher computed into the cache, ``loaded`` rows read from disk, ``hits`` and
            ``misses`` (rows answered from the cache / by the teacher on the fly while training).
    """

    def __init__(self, root: Path, fingerprint: str, max_bytes: int, dtype: str, build_batch_size: int):
        self.root, self.fingerprint = root, fingerprint
        self.max_bytes, self.dtype, self.build_batch_size = max_bytes, dtype, build_batch_size
        self.rows: dict[str, dict[str, dict[str, torch.Tensor]]] = {}  # signature -> key -> name -> tensor
        self.bytes: dict[str, int] = {}
        self.keys: dict[str, list[str]] = {}  # task -> feature index -> key
        self.stats = {"built": 0, "loaded": 0, "hits": 0, "misses": 0}

    # ---- opening --------------------------------------------------------------------------------------------
    @classmethod
    def open(cls, path: Path, teacher: MultiTaskModel, *, max_mb: float = 2048.0, dtype: str = "float16",
             build_batch_size: int = 64, shared: bool = False, field: str = "teacher_cache.path") -> TeacherCache:
        """The cache of ``teacher`` under ``path``.

        ``shared=False`` (the run directory's cache): ``path`` holds one folder per teacher fingerprint, so a
        changed teacher gets a fresh cache. ``shared=True`` (a path the recipe names): ``path`` is this teacher's
        cache, and one written for another teacher is an error naming ``field``.

        Raises:
            RecipeError: ``path`` cannot be written, or (shared) holds another teacher's cache.
        """
        if dtype not in _DTYPES:
            raise RecipeError(f"{field}: dtype must be one of {sorted(_DTYPES)}, got '{dtype}'")
        fingerprint = teacher_fingerprint(teacher)
        root = Path(path) if shared else Path(path) / fingerprint[:16]
        manifest = root / MANIFEST
        if manifest.is_file():
            try:
                recorded = json.loads(manifest.read_text(encoding="utf-8")).get("teacher")
            except (OSError, ValueError) as exc:
                raise RecipeError(f"{field}: {manifest} is not a readable teacher-cache manifest ({exc})") from None
            if recorded != fingerprint:
                raise RecipeError(f"{field}: {root} holds the cache of another teacher (weights {str(recorded)[:12]}, "
                                  f"this stage's teacher {fingerprint[:12]}); give another path or delete it")
        check_writable(root, field)
        if not manifest.is_file():
            _write_json(manifest, {"teacher": fingerprint})
        cache = cls(root, fingerprint, int(max_mb * 2**20), dtype, build_batch_size)
        return cache

    def _load(self, sig: str) -> None:
        """Read every finished shard of one parts folder (later shards win)."""
        if sig in self.rows:
            return
        from safetensors import safe_open

        rows: dict[str, dict[str, torch.Tensor]] = {}
        for shard in sorted((self.root / sig).glob("shard-*.safetensors")):
            with safe_open(str(shard), framework="pt") as f:
                keys = json.loads(f.metadata()["keys"])
                for name in f.keys():
                    n, _, part = name.partition("|")
                    rows.setdefault(keys[int(n)], {})[part] = f.get_tensor(name)
        self.rows[sig] = rows
        self.bytes[sig] = sum(t.nbytes for r in rows.values() for t in r.values())
        self.stats["loaded"] += len(rows)

    # ---- building -------------------------------------------------------------------------------------------
    def prepare(self, teacher: MultiTaskModel, features: Mapping[str, Sequence[Mapping[str, Any]]],
                collate: Mapping[str, Any], needs: Needs, device: torch.device, autocast: Any = None) -> None:
        """Key every feature, then run the teacher (no grad, length-sorted batches) on the features the cache
        lacks, shard by shard, until ``max_mb``; ``autocast`` is a context-manager factory for the passes."""
        sig = needs.signature(self.dtype)
        self._load(sig)
        rows = self.rows[sig]
        for task, feats in features.items():
            if task not in self.keys or len(self.keys[task]) != len(feats):
                self.keys[task] = [feature_key(task, f) for f in feats]
        was_training = teacher.training
        teacher.eval()
        for task, feats in features.items():
            todo = [i for i, k in enumerate(self.keys[task]) if k not in rows]
            todo.sort(key=lambda i: len(feats[i]["input_ids"]))
            for start in range(0, len(todo), self.build_batch_size):
                if self.bytes[sig] >= self.max_bytes:
                    break
                idx = todo[start:start + self.build_batch_size]
                batch = collate[task]([feats[i] for i in idx])
                batch = {k: v.to(device) for k, v in batch.items()}
                computed = self.compute(teacher, task, batch, needs, autocast)
                self._write_shard(sig, [self.keys[task][i] for i in idx], computed)
        teacher.train(was_training)

    def compute(self, teacher: MultiTaskModel, task: str, batch: Mapping[str, torch.Tensor], needs: Needs,
                autocast: Any = None) -> list[dict[str, torch.Tensor]]:
        """Run the teacher on ``batch``; one row per feature (see the module docstring), on the CPU."""
        from contextlib import nullcontext

        from compressor.distill.capture import capture_qkv

        with torch.no_grad(), (autocast() if autocast else nullcontext()), \
                capture_qkv(teacher, list(needs.qkv)) as qkv:
            out = teacher.forward_batch(task, batch, output_hidden_states=bool(needs.hidden))
        lengths = batch["attention_mask"].sum(1).tolist()
        dtype = _DTYPES[self.dtype]
        lo = torch.finfo(dtype).min
        rows = []
        for i, n in enumerate(int(x) for x in lengths):
            row = {f"out.{k}": v[i].float().clamp(min=lo).to(dtype).cpu() for k, v in out.outputs.items()
                   if torch.is_tensor(v) and v.is_floating_point()}
            for j in needs.hidden:
                row[f"hidden.{j}"] = out.hidden_states[j][i, :n].to(dtype).cpu()
            for layer in needs.qkv:
                for name in ("query", "key", "value"):
                    row[f"{name}.{layer}"] = qkv[layer][name][i, :n].to(dtype).cpu()
            rows.append(row)
        return rows

    def _write_shard(self, sig: str, keys: list[str], rows: list[dict[str, torch.Tensor]]) -> None:
        from safetensors.torch import save_file

        folder = self.root / sig
        folder.mkdir(parents=True, exist_ok=True)
        kept_keys, tensors, size = [], {}, 0
        for key, row in zip(keys, rows):
            row_bytes = sum(t.nbytes for t in row.values())
            if self.bytes[sig] + size + row_bytes > self.max_bytes:
                break
            for part, t in row.items():
                tensors[f"{len(kept_keys)}|{part}"] = t.contiguous()
            kept_keys.append(key)
            size += row_bytes
        if not kept_keys:
            self.bytes[sig] = self.max_bytes  # full: nothing more fits
            return
        n = len(list(folder.glob("shard-*.safetensors")))
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".shard.", suffix=".tmp")
        os.close(fd)
        try:
            save_file(tensors, tmp, metadata={"keys": json.dumps(kept_keys)})
            os.replace(tmp, folder / f"shard-{n:06d}.safetensors")
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        for key, row in zip(kept_keys, rows):
            self.rows[sig][key] = row
        self.bytes[sig] += size
        self.stats["built"] += len(kept_keys)

    # ---- answering ------------------------------------------------------------------------------------------
    def teacher_outputs(self, teacher: MultiTaskModel, task: str, batch: Mapping[str, torch.Tensor], needs: Needs,
                        student_outputs: Mapping[str, torch.Tensor], autocast: Any = None,
                        ) -> tuple[ModelOutput, dict[int, dict[str, torch.Tensor]]]:
        """The teacher's outputs, hidden states and Q/K/V for ``batch`` (which carries ``feature_index``), shaped
        like the student's: cached rows where held, the teacher on the fly for the rest (those rows only)."""
        sig = needs.signature(self.dtype)
        self._load(sig)
        stored = self.rows[sig]
        keys = [self.keys[task][i] for i in batch[INDEX_KEY].tolist()]
        rows: list[dict[str, torch.Tensor] | None] = [stored.get(k) for k in keys]
        missing = [i for i, r in enumerate(rows) if r is None]
        self.stats["hits"] += len(rows) - len(missing)
        self.stats["misses"] += len(missing)
        if missing:
            sel = torch.tensor(missing, device=batch["input_ids"].device)
            sub = {k: v.index_select(0, sel) for k, v in batch.items() if torch.is_tensor(v) and v.dim() > 0}
            for i, row in zip(missing, self.compute(teacher, task, sub, needs, autocast)):
                rows[i] = row
        return self._assemble(rows, needs, student_outputs, batch)

    def _assemble(self, rows: list[dict[str, torch.Tensor]], needs: Needs, student_outputs: Mapping[str, torch.Tensor],
                  batch: Mapping[str, torch.Tensor]) -> tuple[ModelOutput, dict[int, dict[str, torch.Tensor]]]:
        device = batch["input_ids"].device
        width = batch["input_ids"].shape[1]
        outputs = {k: _stack([r[f"out.{k}"] for r in rows], tuple(v.shape[1:]), PAD_LOGIT, device)
                   for k, v in student_outputs.items() if f"out.{k}" in rows[0]}

        def seq(name: str) -> torch.Tensor:
            parts = [r[name] for r in rows]
            return _stack(parts, (width, parts[0].shape[-1]), 0.0, device)

        hidden: list[torch.Tensor | None] | None = None
        if needs.hidden:
            hidden = [None] * (max(needs.hidden) + 1)
            for j in needs.hidden:
                hidden[j] = seq(f"hidden.{j}")
        qkv = {layer: {n: seq(f"{n}.{layer}") for n in ("query", "key", "value")} for layer in needs.qkv}
        return ModelOutput(outputs, hidden, None), qkv


def _stack(parts: list[torch.Tensor], shape: tuple[int, ...], pad: float, device: torch.device) -> torch.Tensor:
    """Rows cut or padded (with ``pad``) to ``shape`` and stacked, in fp32."""
    out = torch.full((len(parts), *shape), pad, dtype=torch.float32)
    for i, t in enumerate(parts):
        if t.dim() != len(shape):
            raise ValueError(f"cached row of shape {tuple(t.shape)} does not fit {shape}")
        cut = tuple(slice(0, min(a, b)) for a, b in zip(t.shape, shape))
        out[i][cut] = t[cut].float()
    return out.to(device)


def check_writable(path: Path, field: str) -> None:
    """``path`` is (or can become) a directory this process can write, else a RecipeError naming ``field``.
    Creates nothing when it cannot be written."""
    path = Path(path)
    probe_dir = path
    while not probe_dir.exists():
        probe_dir = probe_dir.parent
    if not probe_dir.is_dir():
        raise RecipeError(f"{field}: {path} lies below {probe_dir}, which is a file")
    if not os.access(probe_dir, os.W_OK | os.X_OK):
        raise RecipeError(f"{field}: {path} is not writable ({probe_dir} does not let this user write)")


def _write_json(path: Path, obj: Any) -> None:
    from compressor.fsutil import atomic_write_text

    atomic_write_text(path, json.dumps(obj))


def needs_of(hidden: bool, attention: bool, layer_map: Mapping[int, int]) -> Needs:
    """The teacher parts a loss with these terms and this layer map reads."""
    return Needs(hidden=tuple(sorted({0, *(t + 1 for t in layer_map.values())})) if hidden else (),
                 qkv=tuple(sorted(set(layer_map.values()))) if attention else ())


def open_cache(options: Any, run_dir: Path, teacher: MultiTaskModel, field: str) -> TeacherCache | None:
    """The cache a recipe's ``teacher_cache`` options (a ``TeacherCacheOptions`` or None) ask for: under
    ``<run_dir>/teacher-cache`` (one folder per teacher) unless they name a ``path`` of its own."""
    if options is None:
        return None
    shared = options.path is not None
    path = Path(options.path).expanduser().resolve() if shared else Path(run_dir) / "teacher-cache"
    return TeacherCache.open(path, teacher, max_mb=options.max_mb, dtype=options.dtype,
                             build_batch_size=options.build_batch_size, shared=shared, field=f"{field}.path")


def check_recipe_caches(recipe: Any) -> None:
    """Before anything is written: every cache folder a recipe names (``teacher_cache.path`` of a distill stage
    or of a prune / search recovery) can be written, and one that already holds a cache was written for this
    run's teacher when that teacher is a ``load`` stage's model (a trained teacher is checked when it exists)."""
    first = next((s for s in recipe.stages if s.kind in ("train", "load")), None)
    teacher_path = Path(first.path).expanduser().resolve() if first is not None and first.kind == "load" else None
    for i, stage in enumerate(recipe.stages):
        for field, opts in ((f"stages[{i}].teacher_cache", getattr(stage, "teacher_cache", None)),
                            (f"stages[{i}].recovery.teacher_cache",
                             getattr(getattr(stage, "recovery", None), "teacher_cache", None))):
            if opts is None or opts.path is None:
                continue
            path = Path(opts.path).expanduser().resolve()
            check_writable(path, f"{field}.path")
            if (path / MANIFEST).is_file() and teacher_path is not None \
                    and (field.endswith("].teacher_cache") or stage.recovery.teacher == "teacher"):
                from compressor.model.io import load_model

                teacher, _, _ = load_model(teacher_path)
                TeacherCache.open(path, teacher, shared=True, field=f"{field}.path")
