"""Every method option declares the values it admits, and both the registry and the CLI's early check (the source
index, no torch) refuse the others in the same one line, before any model loads."""

import dataclasses
import math

import pytest

from kvbench.harness.cli import fast_checks
from kvbench.harness.errors import KVBenchError
from kvbench.harness.method_spec import ALLOWED, Allowed, allowed_values, format_value, option
from kvbench.methods import REGISTRY, get_method, load_all

load_all()
METHODS = sorted(name for name in REGISTRY if fast_checks.method_index().get(name))

# Values every numeric option is tried with, as the command line gives them.
PROBES = ("-3", "0", "nan", "abc")

# Fields whose boundary values only build together with another field (a check of several fields).
COMPANIONS = {("autoencoder", "tokens"): {"window": 2}}


def _numeric(default) -> bool:
    return isinstance(default, (int, float)) and not isinstance(default, bool)


def _fields(name: str) -> list[tuple[dataclasses.Field, object]]:
    config = REGISTRY[name].Config
    defaults = config()
    return [(field, getattr(defaults, field.name)) for field in dataclasses.fields(config)]


def _numeric_fields() -> list[tuple[str, str]]:
    return [(name, field.name) for name in METHODS for field, default in _fields(name) if _numeric(default)]


def _base_fields() -> list[tuple[str, str, str]]:
    """(method, base, option) for every numeric option of every base a `base` field admits."""
    found = []
    for name in METHODS:
        fields = {field.name: field for field, _ in _fields(name)}
        if "base" in fields and "base_options" in fields:
            for base in allowed_values(fields["base"]).choices:
                found += [(name, base, field.name) for field, default in _fields(base) if _numeric(default)]
    return found


def _outcome(check, spec: str) -> str | None:
    try:
        check(spec)
    except KVBenchError as error:
        return str(error)
    return None


def test_the_registry_holds_the_methods_the_index_reads():
    assert len(METHODS) == len(REGISTRY) >= 20
    assert len(_numeric_fields()) >= 80


@pytest.mark.parametrize("name", METHODS)
def test_every_numeric_option_declares_its_range(name):
    """An option without a declared range would admit -3 and nan silently: every int and float field says what it
    admits (a bound or a fixed set), and its default lies inside."""
    for field, default in _fields(name):
        if not _numeric(default):
            continue
        assert ALLOWED in field.metadata, f"{name}.{field.name} declares no range; write option(default, ...)"
        allowed = allowed_values(field)
        bounded = (allowed.at_least, allowed.above, allowed.at_most, allowed.below) != (None,) * 4
        assert bounded or allowed.choices, f"{name}.{field.name} declares no bound and no choices"
        assert allowed.problem(default, default) is None


@pytest.mark.parametrize(("name", "field_name"), _numeric_fields())
def test_out_of_range_values_are_refused_in_one_line_early_and_late(name, field_name):
    field, default = next(item for item in _fields(name) if item[0].name == field_name)
    allowed = allowed_values(field)
    for text in PROBES:
        spec = f"{name}:{field_name}={text}"
        try:
            value = type(default)(text)
        except ValueError:
            value = text
        admitted = allowed.problem(value, default) is None
        late = _outcome(get_method, spec)
        early = _outcome(fast_checks.check_method, spec)
        assert early == late, spec
        if admitted:
            assert late is None, f"{spec}: the declared range admits it, yet: {late}"
            continue
        assert late is not None, f"{spec} is outside {allowed.describe(default)}, yet the method was built"
        assert "\n" not in late
        assert late.startswith(f"{name}: option {field_name}={text if value is text else format_value(value)} is ")
        assert late.endswith(f"; {field_name} must be {allowed.describe(default)}")


@pytest.mark.parametrize(("name", "base", "field_name"), _base_fields())
def test_base_scorer_options_are_checked_early_and_late(name, base, field_name):
    field, default = next(item for item in _fields(base) if item[0].name == field_name)
    allowed = allowed_values(field)
    for text in PROBES:
        spec = f"{name}:base={base}:base_options={field_name}={text}"
        late = _outcome(get_method, spec)
        assert _outcome(fast_checks.check_method, spec) == late, spec
        try:
            value = type(default)(text)
        except ValueError:
            value = text
        if allowed.problem(value, default) is None:
            assert late is None, spec
        else:
            assert late is not None and late.startswith(f"{name}: base {base}: option {field_name}="), (spec, late)
            assert late.endswith(f"; {field_name} must be {allowed.describe(default)}")


def _boundaries(allowed: Allowed, default) -> list[tuple[object, bool]]:
    """(value, admitted) at each declared bound: the bound (or the nearest value inside it) and the nearest value
    outside it."""
    if allowed.choices is not None:
        return [(choice, True) for choice in allowed.choices] + [(max(allowed.choices) + 1, False)]
    integer = isinstance(default, int)

    def step(value, direction: float):
        return value + int(direction) if integer else math.nextafter(float(value), direction * math.inf)

    found = []
    if allowed.at_least is not None:
        found += [(allowed.at_least, True), (step(allowed.at_least, -1), False)]
    if allowed.above is not None:
        found += [(step(allowed.above, 1), True), (allowed.above, False)]
    if allowed.at_most is not None:
        found += [(allowed.at_most, True), (step(allowed.at_most, 1), False)]
    if allowed.below is not None:
        found += [(step(allowed.below, -1), True), (allowed.below, False)]
    if allowed.odd:
        found = [(value + 1 if admitted and value % 2 == 0 else value, admitted) for value, admitted in found]
        found.append((default + 1, False))  # the default is odd
    if not integer:
        found = [(float(value), admitted) for value, admitted in found] + [(math.inf, False), (-math.inf, False)]
    return found


@pytest.mark.parametrize(("name", "field_name"), _numeric_fields())
def test_every_boundary_the_range_admits_builds_the_method(name, field_name):
    field, default = next(item for item in _fields(name) if item[0].name == field_name)
    allowed = allowed_values(field)
    companions = COMPANIONS.get((name, field_name), {})
    for value, admitted in _boundaries(allowed, default):
        text = repr(value) if isinstance(value, float) else str(value)
        spec = ":".join([name, *(f"{k}={v}" for k, v in companions.items()), f"{field_name}={text}"])
        late = _outcome(get_method, spec)
        assert _outcome(fast_checks.check_method, spec) == late, spec
        if admitted:
            assert late is None, f"{spec} lies inside {allowed.describe(default)}, yet: {late}"
            assert getattr(get_method(name, **companions, **{field_name: value}).config, field_name) == value
        else:
            assert late is not None and f"option {field_name}=" in late, spec


def test_the_python_api_refuses_the_same_values():
    """`get_method(name, **options)` and `Method(config)` check typed values as the command line's texts are."""
    with pytest.raises(
        KVBenchError, match=r"^snapkv: option window=-3 is out of range; window must be an integer >= 1$"
    ):
        get_method("snapkv", window=-3)
    with pytest.raises(KVBenchError, match=r"^snapkv: option window=8\.0 is not an integer"):
        get_method("snapkv", window=8.0)
    with pytest.raises(KVBenchError, match=r"^h2o: option recent_ratio=nan is out of range"):
        REGISTRY["h2o"](REGISTRY["h2o"].Config(recent_ratio=math.nan))
    assert get_method("h2o", recent_ratio=1).config.recent_ratio == 1  # an int is a number


def test_checks_of_several_options_name_both_and_wait_for_the_registry():
    late = _outcome(get_method, "kivi:residual=100")
    assert late is not None and late.startswith("kivi: options residual=100 and group_size=32 do not fit")
    assert _outcome(fast_checks.check_method, "kivi:residual=100") is None  # left to the registry
    assert _outcome(get_method, "kivi:residual=96:group_size=32") is None
    late = _outcome(get_method, "autoencoder:tokens=1000")
    assert late is not None and late.startswith("autoencoder: options tokens=1000 and window=2048 do not fit")
    late = _outcome(get_method, "autoencoder:latent_dim=16:latent_group_size=3")
    assert late is not None and "latent_dim=16 and latent_group_size=3" in late


def test_choices_are_the_sets_the_methods_use():
    """Choices are written as literals where the set lives in another module (the index reads one module): they
    must stay that set."""
    from kvbench.harness.cache.quantized_prefix import BITS
    from kvbench.methods.attention_clustering.kmeans import CENTROID_RULES
    from kvbench.methods.common.scorers import SCORERS
    from kvbench.methods.lightweight import features

    def choices(name, field_name):
        return next(allowed_values(f) for f, _ in _fields(name) if f.name == field_name).choices

    assert choices("adakv", "base") == choices("adaptive_policy", "base") == tuple(SCORERS)
    assert choices("kivi", "key_bits") == choices("kivi", "value_bits") == (0, *BITS)
    assert choices("lightweight", "scorer") == features.SCORERS
    assert choices("attention_clustering", "centroid_rule") == CENTROID_RULES


def test_the_vocabulary_describes_and_refuses():
    assert Allowed(at_least=1, odd=True).describe(5) == "an odd integer >= 1"
    assert Allowed(above=0, at_most=1).describe(0.5) == "a number in (0, 1]"
    assert Allowed(above=0).describe(1e-3) == "a finite number > 0"
    assert Allowed(at_least=0, below=1).describe(0.5) == "a number in [0, 1)"
    assert Allowed(choices=("avg", "max")).describe("avg") == "one of avg, max"
    assert Allowed().describe(True) == "true or false"
    assert Allowed(at_least=0).problem(math.inf, 0.0) == "out of range"
    assert Allowed(at_least=0).problem(True, 0) == "not an integer"
    assert Allowed(at_least=0).problem("3", 0) == "not an integer"
    assert Allowed(at_least=0).problem(3, 0.0) is None
    with pytest.raises(ValueError, match="default 0 is not an integer >= 1"):
        option(0, at_least=1)
    with pytest.raises(TypeError, match="not both"):
        option(1, at_least=0, above=0)


def test_the_index_reads_names_bound_at_the_top_of_a_module():
    index = {option.name: option for option in fast_checks.method_index()["autoencoder"].options}
    assert index["activation"].allowed.choices == ("none", "relu")  # choices=ACTIVATIONS
    assert index["latent_bits"].allowed.choices == (0, 2, 4, 8, 16, 32)  # choices=(0, *LATENT_BITS)
