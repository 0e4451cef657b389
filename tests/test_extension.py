"""The house is cheap to change: a new mHC setting is one MHCConfig field, a new H_res constraint one
register_constraint call, a new architecture one register_architecture call. Each test makes the change the way a
contributor would and checks that everything downstream (flags, config files, checkpoints, the model, training)
picks it up without another edit."""
import dataclasses

import pytest
import torch

from nanochat.common import UserError, flat_fields, from_flat_dict, to_flat_dict
from nanochat.config import TrainConfig, build_config
from nanochat.gpt import ARCHITECTURES, GPT, Architecture, GPTConfig, register_architecture
from nanochat.mhc import CONSTRAINTS, MHCConfig, register_constraint, sinkhorn


def _tiny_gpt(**mhc) -> GPTConfig:
    return GPTConfig(sequence_len=16, vocab_size=64, n_layer=2, n_head=2, n_kv_head=2, n_embd=32,
                     mhc=MHCConfig(enabled=True, num_streams=2, **mhc))


@pytest.mark.parametrize("name", [f.name for f in dataclasses.fields(MHCConfig)])
def test_every_mhc_setting_is_a_flag_a_config_key_and_a_checkpoint_key(name, tmp_path):
    """Declared once in MHCConfig: --mhc-<name> on the command line, mhc_<name> in a TOML file, in TrainConfig and in
    the model config a checkpoint stores, and read back from it."""
    field = next(f for f in dataclasses.fields(MHCConfig) if f.name == name)
    flat = f"mhc_{name}"
    assert flat in dict(flat_fields(TrainConfig)) and flat in dict(flat_fields(GPTConfig))
    # a value other than the default, through the flag and through a config file
    if field.type in (bool, "bool"):
        value, flag = not field.default, [f"--{'no-' if field.default else ''}mhc-{name.replace('_', '-')}"]
    elif field.type in (int, "int"):
        value, flag = field.default + 1, [f"--mhc-{name.replace('_', '-')}", str(field.default + 1)]
    elif field.type in (float, "float"):
        value = 0.5 if field.default != 0.5 else 0.25
        flag = [f"--mhc-{name.replace('_', '-')}", str(value)]
    else:
        value = {"constraint": "orthostochastic", "ns_coeffs": "quintic", "readout": "sum"}[name]
        flag = [f"--mhc-{name.replace('_', '-')}", value]
    enable = [] if name == "enabled" else ["--mhc-enabled"]  # mHC settings without mHC are refused
    cfg, _ = build_config(TrainConfig, enable + flag, description="test")
    assert getattr(cfg.mhc, name) == value
    toml = tmp_path / "c.toml"
    toml.write_text(f"{flat} = {str(value).lower() if isinstance(value, bool) else repr(value)}\n"
                    .replace("'", '"') + ("mhc_enabled = true\n" if enable else ""))
    cfg, _ = build_config(TrainConfig, ["--config", str(toml)], description="test")
    assert getattr(cfg.mhc, name) == value
    model_cfg = GPTConfig(mhc=dataclasses.replace(MHCConfig(enabled=True), **{name: value}))
    stored = model_cfg.to_dict()
    assert stored[flat] == value
    assert getattr(GPTConfig.from_dict(stored).mhc, name) == value


def test_a_new_constraint_is_one_register_call():
    """A contributor's H_res manifold: Sinkhorn at half the temperature. After one register_constraint call it is a
    value of --mhc-constraint, it builds, trains (gradients reach b_res) and its H_res is doubly stochastic."""
    register_constraint("sinkhorn_sharp", lambda logits, c: sinkhorn(2 * logits, c.sinkhorn_iters))
    try:
        cfg, _ = build_config(TrainConfig, ["--mhc-enabled", "--mhc-constraint", "sinkhorn_sharp"], description="t")
        assert cfg.mhc.constraint == "sinkhorn_sharp"
        torch.manual_seed(0)
        model = GPT(_tiny_gpt(constraint="sinkhorn_sharp"))
        model.init_weights()
        model.capture_mhc(True)
        idx = torch.randint(0, 64, (2, 16))
        loss = model(idx, targets=idx)
        loss.backward()
        for layer in model.captured_mhc():
            H = layer["H_res"].double()
            torch.testing.assert_close(H.sum(-1), torch.ones_like(H.sum(-1)), atol=1e-3, rtol=0)
            torch.testing.assert_close(H.sum(-2), torch.ones_like(H.sum(-2)), atol=1e-3, rtol=0)
        b_res = [p for n, p in model.named_parameters() if n.endswith("b_res")]
        assert b_res and all(p.grad is not None and p.grad.abs().sum() > 0 for p in b_res)
    finally:
        CONSTRAINTS.pop("sinkhorn_sharp")
    with pytest.raises(UserError, match="mhc_constraint must be one of sinkhorn, orthostochastic"):
        MHCConfig(enabled=True, constraint="sinkhorn_sharp").validate()


class _NoFinalNorm(Architecture):
    """A third architecture: the baseline without the final norm, with a flag only it reads."""
    name = "nofinalnorm"
    training_flags = ("ngpt_lr",)  # borrowed: an existing TrainConfig field only this variant accepts changed

    def final(self, x):
        return x


def test_a_new_architecture_is_one_register_call():
    register_architecture(_NoFinalNorm())
    try:
        cfg, _ = build_config(TrainConfig, ["--arch", "nofinalnorm"], description="t")
        assert cfg.arch == "nofinalnorm"
        torch.manual_seed(0)
        config = dataclasses.replace(_tiny_gpt(), arch="nofinalnorm", mhc=MHCConfig())
        model = GPT(config)
        model.init_weights()
        assert model.architecture.name == "nofinalnorm"
        baseline = GPT(dataclasses.replace(config, arch="gpt"))
        baseline.load_state_dict(model.state_dict())
        idx = torch.randint(0, 64, (2, 16))
        # the same weights, one hook different: the logits differ, and both train
        assert not torch.allclose(model(idx), baseline(idx))
        model(idx, targets=idx).backward()
        assert all(p.grad is not None for p in model.parameters())
        assert GPTConfig.from_dict(config.to_dict()).arch == "nofinalnorm"
    finally:
        ARCHITECTURES.pop("nofinalnorm")
    with pytest.raises(UserError, match="arch must be one of"):
        build_config(TrainConfig, ["--arch", "nofinalnorm"], description="t")


def test_flat_names_round_trip_every_nested_setting():
    cfg = TrainConfig()
    flat = to_flat_dict(cfg)
    assert all(k.startswith("mhc_") for k in flat if k in {f"mhc_{f.name}" for f in dataclasses.fields(MHCConfig)})
    assert from_flat_dict(TrainConfig, flat) == cfg
