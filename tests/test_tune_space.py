"""Published search spaces: every shipped file parses; bad files are refused naming file and key."""

import pytest
import yaml
from platebench.harness.errors import HarnessError
from platebench.harness.tune import space as tune_space
from platebench.methods.registry import names


def test_every_method_has_a_valid_published_space():
    for method in names():
        space = tune_space.for_method(method)
        assert {"lr", "weight_decay"} <= set(space.params), method
        cls_defaults = __import__("platebench.methods", fromlist=["get_method"]).get_method(method).all_defaults()
        assert set(space.params) <= set(cls_defaults)


def test_every_published_space_starts_from_its_methods_defaults():
    """The space's default configuration (evaluated first by every sweep) is the method's own."""
    from platebench.methods import get_method

    for method in names():
        defaults = get_method(method).all_defaults()
        for name, p in tune_space.for_method(method).params.items():
            assert p.default == pytest.approx(defaults[name]), (method, name, p.default, defaults[name])


def test_a_space_reaching_outside_the_methods_valid_values_is_refused(tmp_path):
    data = {"method": "erm", "params": {"lr": {"distribution": "uniform", "low": -0.1, "high": 0.1,
                                              "default": 0.001}}}
    with pytest.raises(HarnessError, match=r"params.lr: -0.1 is not a valid value of 'erm''s lr \(in \(0, inf\)\)"):
        tune_space.load(_write(tmp_path, data))
    data = {"method": "erm", "params": {"optimizer": {"distribution": "choice", "values": ["adam", "lion"],
                                                     "default": "adam"}}}
    with pytest.raises(HarnessError, match="'lion' is not a valid value of 'erm''s optimizer"):
        tune_space.load(_write(tmp_path, data))


def test_abra_space_lists_the_papers_searched_quantities():
    space = tune_space.for_method("abra")
    dists = {k: p.distribution for k, p in space.params.items()}
    assert {"step_size", "arcface_margin", "arcface_scale", "js_weight"} <= set(dists)
    assert dists["step_size"] == "loguniform" and space.params["arcface_scale"].values == (16.0, 30.0, 64.0)


def test_cs_arm_bn_space_searches_query_and_control_context_sizes():
    assert {"batch_size", "n_controls", "eval_n_controls"} <= set(tune_space.for_method("cs-arm-bn").params)


def _write(tmp_path, data):
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


GOOD = {"method": "abra", "params": {"step_size": {"distribution": "loguniform", "low": 0.01, "high": 1.0,
                                                   "default": 0.1}}}


@pytest.mark.parametrize("edit,message", [
    (lambda d: d.update(colour="red"), r"unknown key\(s\) \['colour'\]"),
    (lambda d: d["params"]["step_size"].update(low=2.0), r"params.step_size: empty range"),
    (lambda d: d["params"]["step_size"].update(default=5.0), r"params.step_size.default 5.0 is outside"),
    (lambda d: d["params"]["step_size"].update(distribution="gaussian"), r"params.step_size.distribution must be"),
    (lambda d: d["params"]["step_size"].update(sigma=1), r"params.step_size: unknown key\(s\) \['sigma'\]"),
    (lambda d: d["params"].update(stepsize={"distribution": "uniform", "low": 0, "high": 1, "default": 0.5}),
     r"\['stepsize'\] are not hyperparameters of method 'abra'"),
    (lambda d: d["params"].update(arcface_scale={"distribution": "choice", "values": [], "default": 30}),
     r"params.arcface_scale.values: empty choice"),
    (lambda d: d.update(datasets={"rxrx1": {"params": {"lr": {"distribution": "loguniform", "low": 0,
                                                              "high": 1, "default": 0.1}}}}),
     r"\(datasets.rxrx1\): params.lr: loguniform needs low > 0"),
])
def test_bad_space_files_are_refused_naming_file_and_key(tmp_path, edit, message):
    import copy

    data = copy.deepcopy(GOOD)
    edit(data)
    path = _write(tmp_path, data)
    with pytest.raises(HarnessError, match=message) as err:
        tune_space.load(path)
    assert path in str(err.value)


def test_dataset_overrides_apply_only_to_that_dataset(tmp_path):
    data = {**GOOD, "datasets": {"rxrx1-wilds": {"params": {"lr": {"distribution": "loguniform", "low": 1e-4,
                                                                  "high": 1e-3, "default": 1e-3}}}}}
    path = _write(tmp_path, data)
    assert "lr" in tune_space.load(path, dataset="rxrx1-wilds").params
    assert "lr" not in tune_space.load(path, dataset="quickstart").params


def test_unreadable_space_and_suite_files_are_refused_naming_the_file(tmp_path):
    from platebench.harness.suite import Suite

    bad = tmp_path / "bad.yaml"
    bad.write_text("params: [unclosed\n")
    with pytest.raises(HarnessError, match=rf"{bad}: not valid YAML"):
        tune_space.load(bad)
    with pytest.raises(HarnessError, match=rf"{bad}: not valid YAML"):
        Suite.load(bad)
    with pytest.raises(HarnessError, match=rf"{tmp_path / 'none.yaml'}: search space file not found"):
        tune_space.load(tmp_path / "none.yaml")
    with pytest.raises(HarnessError, match=rf"{tmp_path / 'none.yaml'}: suite file not found"):
        Suite.load(tmp_path / "none.yaml")
