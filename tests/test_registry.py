"""The one registry class: registration, lookup, its error format and dotted paths."""

import pytest

from adamerge.core.registry import Registry, UnknownNameError


def test_register_and_get():
    things = Registry("thing")

    @things.register("square")
    def square(x):
        return x * x

    assert things.get("square") is square and "square" in things and things.names() == ["square"]
    assert things.unregister("square") is square and "square" not in things
    with pytest.raises(UnknownNameError, match="unknown thing 'square'; use one of \\[\\]"):
        things.unregister("square")


def test_unknown_name_names_the_kind_the_closest_and_the_known():
    things = Registry("merge method")
    things.register("task_arithmetic", len)
    with pytest.raises(UnknownNameError) as caught:
        things.get("task_arithmetc")
    message = str(caught.value)
    assert message == "unknown merge method 'task_arithmetc' (did you mean 'task_arithmetic'?); use one of ['task_arithmetic']"
    assert isinstance(caught.value, KeyError) and isinstance(caught.value, ValueError)


def test_a_clash_is_refused_the_same_entry_twice_is_not():
    things = Registry("thing")
    things.register("a", len)
    things.register("a", len)
    with pytest.raises(ValueError, match="a thing named 'a' is already registered"):
        things.register("a", abs)


def test_dotted_paths_only_where_allowed():
    assert Registry("objective", dotted_paths=True).get("math:sqrt")(9.0) == 3.0
    assert Registry("objective", dotted_paths=True).get("math.sqrt")(4.0) == 2.0
    with pytest.raises(UnknownNameError, match="cannot import objective 'math:nothing'"):
        Registry("objective", dotted_paths=True).get("math:nothing")
    with pytest.raises(UnknownNameError, match="unknown balance 'math:sqrt'; use one of"):
        Registry("balance").get("math:sqrt")


def test_dotted_paths_find_modules_in_the_working_directory(tmp_path, monkeypatch):
    (tmp_path / "my_local_losses.py").write_text("def loss():\n    return 7\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.path", [p for p in __import__("sys").path if p not in ("", str(tmp_path))])
    assert Registry("objective", dotted_paths=True).get("my_local_losses:loss")() == 7
