"""Constraints of CONFIG keys: the braces at the end of a key's comment in a stage's CONFIG,
e.g.
    lr=1e-3,  # Adam learning rate {> 0}
    io_mode="low_dim",  # layout {low_dim | ring}
    prune_sparsity=[0, 0.5],  # sparsities {each >= 0, < 1}
    m_bounds=[-1.0, 1.0],  # clip range of M {None | @increasing_pair}
Alternatives are separated by `|`; an alternative is `None`, a bare word (an allowed string),
comma-separated comparisons with numbers, `each` + comparisons or a bare word (for the
elements of a list), or a named check `@name` from CHECKS. A value passes when it matches one
plain alternative, or when it is a list whose every element matches one `each` alternative.
helper.check_config applies them; `--help` prints them with the comments.
"""
import math
import operator
import re

import numpy as np

from run_folder import RUN_NAME_RULE, SAFE_NAME_CHARS, safe_name

_COMPARISON = re.compile(r"(<=|>=|<|>|==|!=)\s*(\S+)")
_OPS = {"<": operator.lt, "<=": operator.le, ">": operator.gt, ">=": operator.ge,
        "==": operator.eq, "!=": operator.ne}


def _is_number(value):
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def _run_pattern(value):
    """A run name, or a glob of run names (* ? [ ] allowed) that stays in the runs folder."""
    return (isinstance(value, str) and re.fullmatch(rf"[*?\[\]{SAFE_NAME_CHARS}]+", value)
            is not None and not value.startswith("."))


def _increasing_pair(value):
    return (isinstance(value, (list, tuple)) and len(value) == 2
            and all(_is_number(v) and math.isfinite(v) for v in value) and value[0] < value[1])


def _device(value):
    return isinstance(value, str) and re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", value) is not None


def _seed_list(value):
    return isinstance(value, str) and re.fullmatch(r"\s*(\d+\s*(,\s*\d+\s*)*)?,?\s*", value) \
        is not None


def _stage_list(value):
    return isinstance(value, str) and re.fullmatch(r"[a-z_]+(,[a-z_]+)*", value) is not None


def _net_list(value):
    import mpn  # the one home of the architectures
    names = [n for n in str(value).split(",") if n]
    return isinstance(value, str) and all(n in mpn.MODELS for n in names)


def _multiple_of_8(value):
    return isinstance(value, int) and not isinstance(value, bool) and value >= 8 and value % 8 == 0


def _rulesets():
    import mpn_tasks  # the one home of the rule sets (imported only when a key names it)
    return list(mpn_tasks.RULESETS)


def _rule_names():
    import mpn_tasks
    return list(mpn_tasks.TASKS)


def _rule_list(value):
    return (isinstance(value, (list, tuple)) and len(value) > 0
            and all(isinstance(v, str) and v in _rule_names() for v in value))


def _engines():
    import mpn_engine
    return list(mpn_engine.ENGINES)


def _bool(value):
    return isinstance(value, bool)


def _path(value):
    return isinstance(value, str) and value != "" and "\0" not in value


# named checks: name -> (test, what it allows, in words)
CHECKS = {
    "bool": (_bool, "True or False"),
    "ruleset": (lambda v: v in _rulesets(), lambda: f"one of {_rulesets()}"),
    "rules": (_rule_list, lambda: f"a non-empty list of rule names from {_rule_names()}"),
    "engine": (lambda v: v in _engines(), lambda: f"one of {_engines()}"),
    "path": (_path, "a folder path"),
    "run_name": (safe_name, RUN_NAME_RULE),
    "run_pattern": (_run_pattern, "a run name or a glob of run names (letters, digits, "
                                  ". _ - * ? [ ]; not starting with '.')"),
    "increasing_pair": (_increasing_pair, "a pair [low, high] of finite numbers with low < high"),
    "device": (_device, "auto, cpu, mps, cuda or cuda:<index>"),
    "seed_list": (_seed_list, "comma-separated non-negative integers, e.g. 1,2,3"),
    "stage_list": (_stage_list, "comma-separated stage names without spaces, e.g. train,analyze"),
    "net_list": (_net_list, "comma-separated architectures from dmpn, vanilla, gru, e.g. dmpn,gru"),
    "multiple_of_8": (_multiple_of_8, "a positive multiple of 8"),
}


def parse_constraint(text):
    """The braces at the end of a comment -> list of alternatives (each a string), or None."""
    match = re.search(r"\{([^{}]*)\}\s*$", text or "")
    if not match:
        return None
    return [alt.strip() for alt in match.group(1).split("|") if alt.strip()]


def _matches(value, alternative):
    """Does `value` satisfy one alternative (without the `each` prefix)?"""
    if alternative == "None":
        return value is None
    if alternative.startswith("@"):
        name = alternative[1:]
        if name not in CHECKS:
            raise ValueError(f"the config annotation names an unknown check @{name}; "
                             f"known checks: {', '.join('@' + c for c in CHECKS)}.")
        return bool(CHECKS[name][0](value))
    parts = [p.strip() for p in alternative.split(",")]
    comparisons = [_COMPARISON.fullmatch(p) for p in parts]
    if all(comparisons):
        if not _is_number(value) or not math.isfinite(value):
            return False
        return all(_OPS[m.group(1)](value, float(m.group(2))) for m in comparisons)
    return isinstance(value, str) and value == alternative


def describe(alternative):
    """An alternative in words, for error messages."""
    if alternative.startswith("@") and alternative[1:] in CHECKS:
        words = CHECKS[alternative[1:]][1]
        return words() if callable(words) else words
    if alternative.startswith("each "):
        return f"a list whose elements are each {describe(alternative[5:].strip())}"
    return alternative.replace(", ", " and ")


def satisfies(value, alternatives):
    """True when `value` is allowed by the parsed annotation `alternatives`."""
    plain = [a for a in alternatives if not a.startswith("each ")]
    each = [a[len("each "):].strip() for a in alternatives if a.startswith("each ")]
    if any(_matches(value, a) for a in plain):
        return True
    return bool(each) and isinstance(value, (list, tuple)) \
        and all(any(_matches(v, a) for a in each) for v in value)
