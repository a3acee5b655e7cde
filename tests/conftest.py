"""Fixtures shared by several test modules (their helpers are in helpers.py)."""
from pathlib import Path

import pytest
import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

from helpers import MICRO
from tempo.base_model import build_tiny_qwen3
from tempo.config import BaseModelConfig
from tempo.tokenizer import char_tokenizer


@pytest.fixture(scope="session")
def boxed_writer(tmp_path_factory):
    """A real Qwen3 whose weights write `\\boxed{d}` after a prompt, d uniform over 0-6.

    Its one layer adds nothing (zero output projections), so the final state is the current
    token's one-hot embedding and the untied head is a bigram table: each token of the
    answer's frame follows the last, and after `{` every digit is equally likely. Graded
    answers then vary from row to row, so votes, pseudo-rewards and drift have something to see.
    """
    tok = char_tokenizer()
    vocab = len(tok)
    cfg = Qwen3Config(vocab_size=vocab, hidden_size=128, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=256,
                      tie_word_embeddings=False, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                      bos_token_id=None)
    model = Qwen3ForCausalLM(cfg)
    ids = tok.convert_tokens_to_ids
    frame = ["\n", "\\", "b", "o", "x", "e", "d", "{"]
    with torch.no_grad():
        model.model.embed_tokens.weight.zero_()
        model.model.embed_tokens.weight[:, :vocab] = torch.eye(vocab)
        model.model.layers[0].self_attn.o_proj.weight.zero_()
        model.model.layers[0].mlp.down_proj.weight.zero_()
        head = model.lm_head.weight
        head.zero_()
        for a, b in zip(frame, frame[1:]):
            head[ids(b), ids(a)] = 2.0
        for d in range(7):
            head[ids(str(d)), ids("{")] = 1.0
            head[ids("}"), ids(str(d))] = 2.0
        head[tok.eos_token_id, ids("}")] = 2.0
    path = tmp_path_factory.mktemp("boxed_writer")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def micro_model(tmp_path_factory):
    """A randomly initialised Qwen3 of ~4k parameters, saved as a Hugging Face checkpoint."""
    path = tmp_path_factory.mktemp("micro")
    tok = char_tokenizer()
    model = build_tiny_qwen3(MICRO, len(tok), tok.pad_token_id, tok.eos_token_id)
    assert sum(p.numel() for p in model.parameters()) < 10_000
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def tiny_olmo3(vocab_size: int = 97):
    """4 layers (sliding, sliding, sliding, full), window 4 < the test's 13 tokens, YaRN on the
    full layer, and norm weights away from 1 so that a misplaced norm shows."""
    from transformers import Olmo3Config, Olmo3ForCausalLM

    cfg = Olmo3Config(vocab_size=vocab_size, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, sliding_window=4, max_position_embeddings=64,
                      pad_token_id=0, eos_token_id=1,
                      rope_scaling={"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 32})
    torch.manual_seed(3)
    model = Olmo3ForCausalLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(1.0, 0.2)
    return model


@pytest.fixture(scope="session")
def ckpts(tmp_path_factory) -> dict[str, Path]:
    """Tiny Qwen3 policies (tied; untied with a vocabulary TP has to pad), an OLMo3, and critics."""
    from transformers import AutoModelForTokenClassification, Qwen3ForCausalLM

    import tempo.models.hf  # noqa: F401 (registers the OLMo3 critic class)

    root = tmp_path_factory.mktemp("megatron")
    base = BaseModelConfig()
    out = {}
    tied = build_tiny_qwen3(base, vocab_size=98, pad_id=0, eos_id=1)
    tied.save_pretrained(root / "tied")
    out["tied"] = root / "tied"
    cfg = build_tiny_qwen3(base, vocab_size=97, pad_id=0, eos_id=1).config
    cfg.tie_word_embeddings = False
    torch.manual_seed(2)
    untied = Qwen3ForCausalLM(cfg)
    assert untied.lm_head.weight.data_ptr() != untied.model.embed_tokens.weight.data_ptr()
    untied.save_pretrained(root / "untied")
    out["untied"] = root / "untied"
    cfg = tied.config
    cfg.num_labels = 1
    torch.manual_seed(1)
    critic = AutoModelForTokenClassification.from_config(cfg)
    torch.nn.init.normal_(critic.score.weight, std=0.1)
    torch.nn.init.normal_(critic.score.bias, std=0.1)
    critic.save_pretrained(root / "critic")
    out["critic"] = root / "critic"
    olmo = tiny_olmo3()
    olmo.save_pretrained(root / "olmo3")
    out["olmo3"] = root / "olmo3"
    cfg = olmo.config
    cfg.num_labels = 1
    torch.manual_seed(4)
    critic = AutoModelForTokenClassification.from_config(cfg)  # tempo's Olmo3ForTokenClassification
    with torch.no_grad():
        critic.model.load_state_dict(olmo.model.state_dict())
        torch.nn.init.normal_(critic.score.weight, std=0.1)
        torch.nn.init.normal_(critic.score.bias, std=0.1)
    critic.save_pretrained(root / "olmo3_critic")
    out["olmo3_critic"] = root / "olmo3_critic"
    out["root"] = root
    return out
