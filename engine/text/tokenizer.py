"""The CLIP BPE tokenizer with ComfyUI's prompt syntax.

Scope: the byte-level BPE that every CLIP text encoder of Stable Diffusion 1.x, 2.x and SDXL shares (the
vocabulary ships as package data in `clip_tokenizer/`), and ComfyUI's prompt language on top of it
(comfy/sd1_clip.py, `SDTokenizer.tokenize_with_weights`):

- `(text:1.2)` sets a weight, a bare `(text)` multiplies the enclosing weight by 1.1 (so `((x))` is 1.21);
  `\\(` and `\\)` are literal parentheses.
- Each weighted segment is one "word" for chunking: a word is BPE-encoded as a whole and kept inside one
  77-token window unless it has 8 or more tokens, in which case it is split at the window's edge.
- `embedding:name` inserts a textual-inversion embedding's vectors in place of tokens.

A chunk is exactly 77 `(token, weight)` pairs: the start token, up to 75 entries, the end token, then padding
(the end token for OpenAI CLIP-L, 0 for OpenCLIP ViT-H and ViT-bigG). An entry is a token id or, for an
embedding, a 1-D tensor that the text model uses as that position's token embedding.

The BPE pipeline is the one `transformers.CLIPTokenizer` (v5, backed by `tokenizers`) builds: NFC, runs of
whitespace to one space, lowercase, CLIP's pre-tokenisation regex, byte-level mapping, BPE with a `</w>`
end-of-word suffix. Reference: Radford et al. 2021, "Learning Transferable Visual Models From Natural Language
Supervision", and OpenAI's `clip/simple_tokenizer.py`.
"""
from __future__ import annotations

import logging
import os
import re
import zipfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Mapping, Sequence, Union

import torch
from tokenizers import Regex, Tokenizer, normalizers, pre_tokenizers
from tokenizers.models import BPE

logger = logging.getLogger(__name__)

START_TOKEN = 49406  # <|startoftext|>
END_TOKEN = 49407  # <|endoftext|>
CHUNK_LENGTH = 77  # CLIP's context: start token, 75 entries, end token
MAX_WORD_LENGTH = 8  # a word with this many tokens may be split across chunks; shorter ones move whole
EMBEDDING_PREFIX = "embedding:"
EMBEDDING_EXTENSIONS = (".safetensors", ".pt", ".bin")

# CLIP's pre-tokenisation: the special tokens, English contractions, letter runs, single digits, and runs of
# anything else that is not whitespace.
_CLIP_SPLIT = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
# "embedding:" starts an embedding only at the start of a segment or after a space or a newline.
_EMBEDDING_SPLIT = re.compile(" {0}|\n{0}".format(re.escape(EMBEDDING_PREFIX)))
# Escaped parentheses are hidden behind control characters while the weights are parsed.
_ESCAPES = (("\\)", "\0\1"), ("\\(", "\0\2"))

Entry = Union[int, torch.Tensor]
Chunk = list[tuple[Entry, float]]


def build_bpe(vocab_dir: Path | None = None) -> Tokenizer:
    """The CLIP BPE as a `tokenizers.Tokenizer` (no start/end tokens added; they belong to the chunker)."""
    if vocab_dir is None:
        vocab_dir = Path(str(resources.files("engine.text") / "clip_tokenizer"))
    model = BPE.from_file(
        str(vocab_dir / "vocab.json"),
        str(vocab_dir / "merges.txt"),
        continuing_subword_prefix="",
        end_of_word_suffix="</w>",
        fuse_unk=False,
        unk_token="<|endoftext|>",
    )
    bpe = Tokenizer(model)
    bpe.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_CLIP_SPLIT), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    # A literal "<|endoftext|>" in a prompt is the special token, as with transformers' CLIPTokenizer.
    bpe.add_special_tokens(["<|startoftext|>", "<|endoftext|>"])
    return bpe


# ---------------------------------------------------------------------------------------------------------
# Prompt weights


def escape_parentheses(text: str) -> str:
    for literal, hidden in _ESCAPES:
        text = text.replace(literal, hidden)
    return text


def unescape_parentheses(text: str) -> str:
    for literal, hidden in _ESCAPES:
        text = text.replace(hidden, literal[1])
    return text


def split_parentheses(text: str) -> list[str]:
    """Top-level pieces of `text`: plain runs and balanced `(...)` groups (an unclosed group runs to the end)."""
    pieces: list[str] = []
    current = ""
    depth = 0
    for char in text:
        if char == "(":
            if depth == 0:
                if current:
                    pieces.append(current)
                current = "("
            else:
                current += char
            depth += 1
        elif char == ")":
            depth -= 1
            if depth == 0:
                pieces.append(current + ")")
                current = ""
            else:
                # A stray ")" at depth 0 drives the depth negative and is kept as text, as ComfyUI does.
                current += char
        else:
            current += char
    if current:
        pieces.append(current)
    return pieces


def parse_weights(text: str, weight: float = 1.0) -> list[tuple[str, float]]:
    """`(segment, weight)` pairs of ComfyUI's emphasis syntax (on text whose escapes are already hidden)."""
    out: list[tuple[str, float]] = []
    for piece in split_parentheses(text):
        if len(piece) >= 2 and piece[0] == "(" and piece[-1] == ")":
            inner = piece[1:-1]
            inner_weight = weight * 1.1
            colon = inner.rfind(":")
            if colon > 0:  # a colon at position 0 is text, not a weight
                try:
                    inner_weight = float(inner[colon + 1:])  # Python's float(): " 1.2", "1e-1" and "inf" parse
                    inner = inner[:colon]
                except ValueError:
                    pass
            out += parse_weights(inner, inner_weight)
        else:
            out.append((piece, weight))
    return out


# ---------------------------------------------------------------------------------------------------------
# Textual-inversion embeddings


@dataclass(frozen=True)
class EmbeddingSource:
    """The embeddings folders (ComfyUI's `models/embeddings`), searched for `embedding:name` in a prompt.

    A name is looked up in each folder and its subfolders, first as given, then with `.safetensors`, `.pt`
    and `.bin` appended. Names that would leave a folder are never followed.
    """

    folders: tuple[Path, ...]

    @classmethod
    def of(cls, *folders: str | os.PathLike[str]) -> EmbeddingSource:
        return cls(tuple(Path(f) for f in folders))

    def find(self, name: str) -> Path | None:
        for folder in self._search_folders():
            base = folder.resolve()
            candidate = Path(os.path.abspath(base / name))
            try:
                if os.path.commonpath((base, candidate)) != str(base):
                    continue
            except ValueError:  # a different drive on Windows
                continue
            if candidate.is_file():
                return candidate
            for extension in EMBEDDING_EXTENSIONS:
                with_extension = candidate.with_name(candidate.name + extension)
                if with_extension.is_file():
                    return with_extension
        return None

    def load(self, name: str, embedding_size: int, key: str | None) -> torch.Tensor | None:
        """The embedding's vectors, `[n, width]` (or `[width]`), or None when it is missing or unreadable."""
        path = self.find(name)
        if path is None:
            return None
        try:
            data = _read_embedding_file(path)
        except Exception:
            logger.warning("could not read embedding %s, ignoring it", path, exc_info=True)
            return None
        return _embedding_vectors(data, embedding_size, key)

    def _search_folders(self) -> list[Path]:
        # ComfyUI searches every subfolder too; sorted here so the first match never depends on hash order.
        found: list[Path] = []
        for folder in self.folders:
            if not folder.is_dir():
                continue
            found.append(folder)
            subfolders = [Path(root) for root, _dirs, _files in os.walk(folder, followlinks=True)]
            found += sorted(p for p in subfolders if p != folder)
        return found


def _read_embedding_file(path: Path) -> object:
    if path.name.lower().endswith(".safetensors"):
        import safetensors.torch

        return safetensors.torch.load_file(str(path), device="cpu")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        # Old pickles that the safe unpickler refuses: read the raw float storage as ComfyUI does.
        vectors = _raw_vectors_from_zip(path)
        if vectors is None:
            raise
        return vectors


def _raw_vectors_from_zip(path: Path) -> torch.Tensor | None:
    """The last float32 storage of a torch zip file that holds whole 768- (SD1) or 1024-wide (SD2) vectors."""
    with zipfile.ZipFile(path) as archive:
        names = [n for n in archive.namelist() if "data/" in n]
        for name in reversed(names):
            raw = archive.read(name)
            count = len(raw) // 4
            if count < 768:
                continue
            width = 768 if count % 768 == 0 else 1024
            return torch.frombuffer(bytearray(raw), dtype=torch.float32).reshape(count // width, width).clone()
    return None


def _embedding_vectors(data: object, embedding_size: int, key: str | None) -> torch.Tensor | None:
    """Pick the vectors out of the known embedding file formats, in ComfyUI's order of preference."""
    if isinstance(data, torch.Tensor):
        return data
    if isinstance(data, list):  # a list of {name: tensor}: every tensor of the right width, in order
        parts = [t.reshape(-1, t.shape[-1]) for item in data for t in item.values() if t.shape[-1] == embedding_size]
        return torch.cat(parts) if parts else None
    if not isinstance(data, Mapping) or not data:
        return None
    if "string_to_param" in data:  # Automatic1111 format: {"string_to_param": {"*": tensor}}
        return next(iter(data["string_to_param"].values()))
    if key is not None and key in data:  # SDXL format: {"clip_l": ..., "clip_g": ...}
        return data[key]
    bundled = _bundled(data, ".string_to_param.*")
    if bundled is None:
        bundled = _bundled(data, f".{key}")
    if bundled is not None:  # embeddings bundled in a LoRA file
        return bundled
    return next(iter(data.values()))  # e.g. {"emb_params": tensor}


def _bundled(data: Mapping[str, torch.Tensor], suffix: str) -> torch.Tensor | None:
    parts = [v for k, v in data.items() if k.startswith("bundle_emb.") and k.endswith(suffix)]
    return torch.cat(parts) if parts else None


# ---------------------------------------------------------------------------------------------------------
# The tokenizer


class ClipTokenizer:
    """CLIP BPE plus ComfyUI's weights, embeddings and 77-token chunking.

    `pad_token` None pads with the end token (OpenAI CLIP-L in SD1 and SDXL); OpenCLIP ViT-H (SD2) and ViT-bigG
    (SDXL) pad with 0. `embedding_size` and `embedding_key` choose the vectors of an embedding file (768 and
    "clip_l" for CLIP-L, 1024 for ViT-H, 1280 and "clip_g" for ViT-bigG).
    """

    def __init__(
        self,
        pad_token: int | None = None,
        *,
        embedding_size: int = 768,
        embedding_key: str | None = "clip_l",
        bpe: Tokenizer | None = None,
    ):
        self.bpe = bpe if bpe is not None else build_bpe()
        self.start_token = START_TOKEN
        self.end_token = END_TOKEN
        self.pad_token = END_TOKEN if pad_token is None else pad_token
        self.embedding_size = embedding_size
        self.embedding_key = embedding_key

    def encode(self, text: str) -> list[int]:
        """BPE token ids of `text`, without start and end tokens."""
        return self.bpe.encode(text, add_special_tokens=False).ids

    def empty_chunk(self) -> Chunk:
        """The chunk of an empty prompt: start, end, padding."""
        return self._close([(self.start_token, 1.0)])

    def tokenize_with_weights(
        self,
        text: str,
        embeddings: EmbeddingSource | None = None,
        embedding_key: str | None = None,
    ) -> list[Chunk]:
        """Chunks of exactly 77 `(token id or embedding vector, weight)` pairs.

        Without `embeddings`, `embedding:name` is plain text (ComfyUI without an embeddings folder); with them,
        a name that is not found is logged and dropped, as ComfyUI does.
        """
        key = self.embedding_key if embedding_key is None else embedding_key
        words: list[list[tuple[Entry, float]]] = []
        for segment, weight in parse_weights(escape_parentheses(text)):
            for piece in self._pieces(unescape_parentheses(segment)):
                if piece.startswith(EMBEDDING_PREFIX) and embeddings is not None:
                    vectors, piece = self._embedding(piece, embeddings, key)
                    if vectors is not None:
                        rows = [vectors] if vectors.ndim == 1 else list(vectors.reshape(-1, vectors.shape[-1]))
                        words.append([(row, weight) for row in rows])
                    if not piece:
                        continue
                words.append([(t, weight) for t in self.encode(piece)])
        return self._chunk(words)

    @staticmethod
    def _pieces(segment: str) -> list[str]:
        first, *rest = _EMBEDDING_SPLIT.split(segment)
        return [p for p in [first] + [EMBEDDING_PREFIX + r for r in rest] if p]

    def _embedding(self, piece: str, source: EmbeddingSource, key: str | None) -> tuple[torch.Tensor | None, str]:
        """The vectors named by `embedding:name rest...`, and the text left over after the name."""
        words = piece[len(EMBEDDING_PREFIX):].strip("\n").split()
        if not words:
            logger.warning("an embedding: without a name in the prompt, ignoring it")
            return None, ""
        name, leftover = words[0], " ".join(words[1:])
        vectors = source.load(name, self.embedding_size, key)
        if vectors is None:
            stripped = name.strip(",")
            if len(stripped) < len(name):
                # "embedding:name," : the name without its commas, which stay as text. ComfyUI slices the
                # original by the stripped length, so leading commas misplace the cut; kept for parity.
                vectors = source.load(stripped, self.embedding_size, key)
                leftover = f"{name[len(stripped):]} {leftover}"
        if vectors is None:
            logger.warning("embedding:%s does not exist, ignoring it", name)
        return vectors, leftover

    def _chunk(self, words: Sequence[list[tuple[Entry, float]]]) -> list[Chunk]:
        room_end = CHUNK_LENGTH - 1  # the last place is the end token's
        chunk: Chunk = [(self.start_token, 1.0)]
        chunks = [chunk]
        for word in words:
            splittable = len(word) >= MAX_WORD_LENGTH
            while word:
                if len(chunk) + len(word) <= room_end:
                    chunk += word
                    break
                room = room_end - len(chunk)
                if splittable:
                    chunk += word[:room]
                    word = word[room:]
                    chunk.append((self.end_token, 1.0))
                else:
                    chunk.append((self.end_token, 1.0))
                    chunk += [(self.pad_token, 1.0)] * room
                chunk = [(self.start_token, 1.0)]
                chunks.append(chunk)
        self._close(chunk)
        return chunks

    def _close(self, chunk: Chunk) -> Chunk:
        chunk.append((self.end_token, 1.0))
        chunk += [(self.pad_token, 1.0)] * (CHUNK_LENGTH - len(chunk))
        return chunk
