"""Build a tiny random-weight Llama and an offline byte-level BPE tokenizer (no hub needed).

    python scripts/make_tiny_model.py OUT_DIR [llama|gemma3]

Used by the engine and server tests. Weights are random (seeded), so outputs are gibberish but
deterministic; the model rarely emits EOS, so callers pass ignore_eos.
"""

from __future__ import annotations

import glob
import json
import sys
import sysconfig
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

SPECIAL = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
           "<|eot_id|>", "<|pad|>"]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)


def build(out: Path, vocab_size: int = 4096, layers: int = 4, kv_heads: int = 2,
          arch: str = "llama") -> None:
    out.mkdir(parents=True, exist_ok=True)
    corpus = sorted(glob.glob(sysconfig.get_paths()["stdlib"] + "/*.py"))[:120]
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train(corpus, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    bos = tok.token_to_id(SPECIAL[0])
    tok.post_processor = processors.TemplateProcessing(
        single=f"{SPECIAL[0]} $A", pair=f"{SPECIAL[0]} $A {SPECIAL[0]} $B",
        special_tokens=[(SPECIAL[0], bos)])
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=SPECIAL[0],
                                     eos_token="<|eot_id|>", pad_token="<|pad|>",
                                     model_max_length=16384)
    hf_tok.chat_template = CHAT_TEMPLATE
    hf_tok.save_pretrained(out)
    if arch == "gemma3":  # hybrid: sliding-window layers and full-attention layers
        from transformers import Gemma3ForCausalLM, Gemma3TextConfig

        cfg = Gemma3TextConfig(
            vocab_size=len(hf_tok), hidden_size=256, intermediate_size=512,
            num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=kv_heads,
            head_dim=64, sliding_window=64, max_position_embeddings=16384,
            layer_types=["sliding_attention", "full_attention"] * (layers // 2),
            bos_token_id=bos, eos_token_id=hf_tok.eos_token_id, pad_token_id=hf_tok.pad_token_id,
            torch_dtype="bfloat16")
        torch.manual_seed(0)
        Gemma3ForCausalLM(cfg).to(torch.bfloat16).save_pretrained(out, safe_serialization=True)
        return
    cfg = LlamaConfig(
        vocab_size=len(hf_tok), hidden_size=256, intermediate_size=512, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=kv_heads, head_dim=64,
        max_position_embeddings=16384, rope_theta=10000.0, rms_norm_eps=1e-5, bos_token_id=bos,
        eos_token_id=hf_tok.eos_token_id, pad_token_id=hf_tok.pad_token_id,
        tie_word_embeddings=False, torch_dtype="bfloat16")
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(out, safe_serialization=True)
    (out / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": bos, "eos_token_id": hf_tok.eos_token_id,
         "pad_token_id": hf_tok.pad_token_id}))


if __name__ == "__main__":
    build(Path(sys.argv[1]), arch=sys.argv[2] if len(sys.argv) > 2 else "llama")
    print("wrote", sys.argv[1])
