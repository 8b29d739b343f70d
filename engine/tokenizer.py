"""Tokenizer and chat template, built from GGUF metadata or a HF `tokenizer.json`."""

from __future__ import annotations

import json
from pathlib import Path

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

from engine.errors import InvalidRequest

# GGUF token types (llama.cpp): 3 = control, 4 = user defined.
_CONTROL, _USER_DEFINED = 3, 4


class ChatTemplate:
    """A jinja chat template rendered in a sandbox, with HF's conventions."""

    def __init__(self, source: str, bos_token: str = "", eos_token: str = "") -> None:
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = self._raise
        self.source = source
        self.template = env.from_string(source)
        self.bos_token, self.eos_token = bos_token, eos_token

    @staticmethod
    def _raise(message: str):
        raise InvalidRequest(f"chat template: {message}")

    def render(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str):
                raise InvalidRequest(f"messages[{i}]: needs a string 'role'")
            if not isinstance(m.get("content"), str):
                raise InvalidRequest(f"messages[{i}]: needs a string 'content'")
        try:
            return self.template.render(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token,
                eos_token=self.eos_token,
            )
        except jinja2.TemplateError as e:
            raise InvalidRequest(f"chat template failed: {e}") from e


class TextTokenizer:
    """Encode/decode plus the ids the engine stops on."""

    def __init__(
        self,
        tok: Tokenizer,
        eos_token_ids: tuple[int, ...],
        bos_token_id: int | None = None,
        add_bos: bool = False,
        chat_template: ChatTemplate | None = None,
    ) -> None:
        self.tok = tok
        self.eos_token_ids = eos_token_ids
        self.bos_token_id = bos_token_id
        self.add_bos = add_bos
        self.chat_template = chat_template

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        ids = self.tok.encode(text, add_special_tokens=False).ids
        if self.add_bos and self.bos_token_id is not None:
            ids = [self.bos_token_id, *ids]
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        if self.chat_template is None:
            raise InvalidRequest("this model has no chat template; send a raw prompt")
        return self.chat_template.render(messages, add_generation_prompt)

    # ---- constructors ----

    @classmethod
    def from_gguf(cls, spec) -> TextTokenizer:
        if spec.model != "gpt2":
            raise InvalidRequest(f"GGUF tokenizer model {spec.model!r} is not supported (gpt2 only)")
        vocab = {t: i for i, t in enumerate(spec.tokens)}
        merges = [tuple(m.split(" ", 1)) for m in spec.merges]
        tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tok.decoder = decoders.ByteLevel()
        special = [
            AddedToken(t, special=True, normalized=False)
            for t, kind in zip(spec.tokens, spec.token_types)
            if kind in (_CONTROL, _USER_DEFINED)
        ]
        tok.add_special_tokens(special)
        bos = spec.tokens[spec.bos_id] if spec.bos_id is not None else ""
        eos = spec.tokens[spec.eos_id] if spec.eos_id is not None else ""
        template = ChatTemplate(spec.chat_template, bos, eos) if spec.chat_template else None
        eos_ids = () if spec.eos_id is None else (int(spec.eos_id),)
        return cls(tok, eos_ids, spec.bos_id, spec.add_bos, template)

    @classmethod
    def from_hf_dir(cls, path: Path, eos_token_ids: tuple[int, ...]) -> TextTokenizer:
        tok = Tokenizer.from_file(str(path / "tokenizer.json"))
        conf_path = path / "tokenizer_config.json"
        conf = json.loads(conf_path.read_text()) if conf_path.exists() else {}
        source = conf.get("chat_template")
        if (path / "chat_template.jinja").exists():
            source = (path / "chat_template.jinja").read_text()
        if isinstance(source, list):  # named templates: take the default one
            source = next((t["template"] for t in source if t.get("name") == "default"), None)

        def token_str(key):
            v = conf.get(key)
            return v.get("content", "") if isinstance(v, dict) else (v or "")

        bos, eos = token_str("bos_token"), token_str("eos_token")
        eos_ids = set(eos_token_ids)
        if eos and tok.token_to_id(eos) is not None:
            eos_ids.add(tok.token_to_id(eos))
        bos_id = tok.token_to_id(bos) if bos else None
        template = ChatTemplate(source, bos, eos) if source else None
        add_bos = bool(conf.get("add_bos_token", False))
        return cls(tok, tuple(sorted(eos_ids)), bos_id, add_bos, template)


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas without re-decoding everything.

    Holds back text that ends in an incomplete UTF-8 sequence (U+FFFD) until the next
    token completes it. Decodes only a small window of recent tokens each step.
    """

    def __init__(self, tokenizer: TextTokenizer, prompt_ids: list[int]) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = list(prompt_ids[-4:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)
        self.text = ""

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        prefix = self.tokenizer.decode(self.ids[self.prefix_offset : self.read_offset])
        full = self.tokenizer.decode(self.ids[self.prefix_offset :])
        if len(full) <= len(prefix) or full.endswith("\ufffd"):
            return ""
        delta = full[len(prefix) :]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        self.text += delta
        return delta
