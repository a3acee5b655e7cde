"""Fixtures shared by several test modules."""
import pytest
import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

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
