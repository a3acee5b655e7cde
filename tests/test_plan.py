"""The memory plan (`tempo plan`): parameter counts against real models, the activation
estimate's response to recomputation and sequence parallelism, and the two H100 configs."""
import pytest
import torch

from tempo.base_model import build_tiny_qwen3
from tempo.cli import main
from tempo.config import BaseModelConfig, load_config
from tempo.errors import ConfigError
from tempo.plan import GIB, Arch, _activations, arch_of, plan


def hf_config_dict(model) -> dict:
    return model.config.to_dict()


@pytest.mark.parametrize("tied", [True, False])
def test_parameter_count_matches_a_qwen3(tied):
    model = build_tiny_qwen3(BaseModelConfig(), vocab_size=97, pad_id=0, eos_id=1)
    cfg = hf_config_dict(model) | {"tie_word_embeddings": tied}
    real = sum(p.numel() for p in model.parameters()) + (0 if tied else 97 * 128)
    assert Arch.from_hf(cfg).params("policy") == real


def test_parameter_count_matches_an_olmo3_and_its_critic():
    from transformers import Olmo3Config, Olmo3ForCausalLM

    import tempo.models.hf  # noqa: F401 (the OLMo3 critic class)
    from transformers import AutoModelForTokenClassification

    cfg = Olmo3Config(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
                      num_key_value_heads=2)
    arch = Arch.from_hf(cfg.to_dict())
    assert arch.params("policy") == sum(p.numel() for p in Olmo3ForCausalLM(cfg).parameters())
    cfg.num_labels = 1
    critic = AutoModelForTokenClassification.from_config(cfg)
    assert arch.params("critic") == sum(p.numel() for p in critic.parameters())


def megatron_config(*extra):
    return load_config("configs/qwen3_14b_h100.yaml", list(extra))


def test_activation_estimate_moves_with_recompute_and_sequence_parallelism():
    arch = arch_of("Qwen/Qwen3-14B")
    act = {r: _activations(arch, megatron_config(f"model.recompute={r}"), 2)[0] for r in ("none", "selective", "full")}
    assert act["full"] < act["selective"] == act["none"]  # TE's flash attention keeps no scores to drop
    no_sp = _activations(arch, megatron_config("model.sequence_parallel=false"), 2)[0]
    assert act["selective"] < no_sp
    # Per layer: 30·s·h/TP bytes with SP against (10 + 20/TP)·s·h without.
    tokens, h = 18432, arch.hidden
    assert no_sp - act["selective"] == pytest.approx(arch.layers * tokens * h * (10 + 20 / 8 - 30 / 8))
    # OLMo3's blocks use Megatron's local attention, which keeps every layer's scores unless recomputed.
    olmo = arch_of("allenai/Olmo-3-1025-7B")
    none = _activations(olmo, megatron_config("model.recompute=none"), 2)
    selective = _activations(olmo, megatron_config("model.recompute=selective"), 2)
    assert none[0] - selective[0] == pytest.approx((olmo.layers - 1) * 5 * olmo.heads * 18432 * tokens / 8)
    assert "scores" in none[1][0] and not selective[1]


def test_the_h100_configs_fit_their_layouts():
    olmo = load_config("configs/olmo3_7b_h100.yaml", [])
    for world in (8, 16):
        result = plan(olmo, world, 80)
        assert result.fits, result.reason()
    qwen = load_config("configs/qwen3_14b_h100.yaml", [])
    assert plan(qwen, 16, 80).fits
    one_node = load_config("configs/qwen3_14b_h100.yaml", ["model.pipeline_parallel=1"])
    result = plan(one_node, 8, 80)
    assert not result.fits and "phase needs" in result.reason()
    assert plan(one_node, 8, 141).fits  # H200
    with pytest.raises(ConfigError, match="not a multiple"):
        plan(qwen, 8, 80)


def test_methods_without_a_critic_plan_none():
    tempo = plan(load_config("configs/olmo3_7b_h100.yaml", []), 8, 80)
    empo = plan(load_config("configs/olmo3_7b_h100.yaml", ["algorithm.method=empo"]), 8, 80)
    assert [label.split()[0] for label, _ in tempo.rows[:2]] == ["policy", "critic"]
    assert not any(label.startswith("critic") for label, _ in empo.rows)
    assert empo.rows[0] == tempo.rows[0] and empo.training < tempo.training


def test_plan_command_refuses_a_layout_that_does_not_fit(capsys):
    assert main(["plan", "--config", "configs/qwen3_14b_h100.yaml", "--world-size", "16"]) == 0
    assert "rollout peak" in capsys.readouterr().out
    code = main(["plan", "--config", "configs/qwen3_14b_h100.yaml", "--world-size", "8",
                 "model.pipeline_parallel=1"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("tempo: error: memory plan: the rollout phase needs") and "\n" not in err


def test_unknown_model_without_a_checkpoint_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="no config.json"):
        arch_of(str(tmp_path / "nowhere"))


@pytest.mark.parametrize("name", ["tempo_olmo3_7b_aime", "tempo_qwen3_8b_aime", "tempo_qwen3_14b_aime",
                                  "empo_olmo3_7b", "empo_qwen3_8b"])
def test_paper_configs_validate_and_batch_as_the_authors(name):
    cfg = load_config(f"configs/paper/{name}.yaml", [])
    assert cfg.train.mixing == "flagged"
    assert cfg.algorithm.e_step_rows == ("masked" if name.startswith("tempo") else "labeled")
    assert cfg.algorithm.method == {"tempo_qwen3_14b_aime": "tempo"}.get(name, "empo" if name.startswith("empo")
                                                                          else "tempo-fixed-critic")
    assert cfg.train.shuffle_minibatches is False and cfg.model.cpu_offload  # verl's split, offload=True
    cfg.model.critic_path = ""  # the self-critic: the policy's architecture
    result = plan(cfg, 4 if name == "empo_qwen3_8b" else 8, 80)  # the script's world size, H100s
    assert result.fits, result.reason()


def test_offload_and_a_frozen_critic_shrink_the_plan():
    def states(*extra):
        result = plan(load_config("configs/olmo3_7b_h100.yaml", list(extra)), 8, 80)
        return {label.split()[0]: size for label, size in result.rows[:2]}, result

    plain, _ = states()
    frozen, _ = states("algorithm.method=tempo-fixed-critic")
    offloaded, result = states("model.cpu_offload=true")
    assert frozen["policy"] == plain["policy"] and frozen["critic"] == pytest.approx(plain["critic"] / 4)
    assert offloaded["policy"] < plain["policy"] / 4 and any("host memory" in n for n in result.notes)
    megatron = {o: plan(megatron_config(f"model.cpu_offload={o}"), 16, 80).rows[0][1] for o in ("false", "true")}
    assert megatron["true"] == pytest.approx(megatron["false"] * 4 / 16)  # bf16 weights + grads of 16 bytes
