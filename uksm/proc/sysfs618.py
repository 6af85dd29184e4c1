"""6.18's /sys/kernel/mm/ksm stores, as a user sees them (``--kernel 6.18``).

Each knob's value is parsed and refused as 6.18 mm/ksm.c's ``*_store``
does (``validate``), and written with the store's side effects
(``store``): the same answers the kernel of this machine gives, checked
against it (tests/api/test_sysfs618.py; tools/twin.py --kernel 6.18).
Under 2.6.32 none of this runs: control.validate_knob keeps 2.6.32's
strict_strtoul stores.

The parsers are lib/kstrtox.c's (kstrtoull and its narrower forms, and
kstrtobool), with the errno each store passes on: most stores answer
EINVAL for any parse error, max_page_sharing_store and
merge_across_nodes_store return kstrto*'s own (ERANGE on overflow).
"""
from __future__ import annotations

from typing import Any

from uksm.kernel.layout import (
    ADVISOR_MODES,
    K_ADVISOR_MAX_CPU,
    K_ADVISOR_MAX_PAGES_TO_SCAN,
    K_ADVISOR_MIN_PAGES_TO_SCAN,
    K_ADVISOR_MODE,
    K_ADVISOR_TARGET_SCAN_TIME,
    K_MAX_PAGE_SHARING,
    K_MERGE_ACROSS_NODES,
    K_PAGES_SHARED,
    K_PAGES_TO_SCAN,
    K_SLEEP_MS,
    K_SMART_SCAN,
    K_STABLE_NODE_CHAINS_PRUNE_MS,
    K_USE_ZERO_PAGES,
)

ULLONG_MAX = (1 << 64) - 1
UINT_MAX = (1 << 32) - 1
INT_MAX = (1 << 31) - 1
DEFAULT_PAGES_TO_SCAN = 100    # 6.18 mm/ksm.c: "#define DEFAULT_PAGES_TO_SCAN 100"

#: the knobs 6.18 adds to 2.6.32's run, pages_to_scan and sleep_millisecs
#: (max_kernel_pages is gone: 2.6.33 "ksm: remove unswappable max_kernel_pages")
KNOBS_618: dict[str, int] = {
    "merge_across_nodes": K_MERGE_ACROSS_NODES,          # 3.9, 90bd6fd31c80
    "max_page_sharing": K_MAX_PAGE_SHARING,              # 4.13, 2c653d0ee2ae
    "stable_node_chains_prune_millisecs": K_STABLE_NODE_CHAINS_PRUNE_MS,  # 4.13
    "use_zero_pages": K_USE_ZERO_PAGES,                  # 4.11, e86c59b1b12d
    "smart_scan": K_SMART_SCAN,                          # 6.7 "mm/ksm: add "smart" page scanning mode"
    "advisor_mode": K_ADVISOR_MODE,                      # 6.8, 4e5fa4f5eff6 "mm/ksm: add ksm advisor"
    "advisor_max_cpu": K_ADVISOR_MAX_CPU,
    "advisor_min_pages_to_scan": K_ADVISOR_MIN_PAGES_TO_SCAN,
    "advisor_max_pages_to_scan": K_ADVISOR_MAX_PAGES_TO_SCAN,
    "advisor_target_scan_time": K_ADVISOR_TARGET_SCAN_TIME,
}
#: the stores that answer EBUSY while KSM pages exist (pages_shared != 0):
#: they would change the stable tree's shape under its nodes
BUSY_WHILE_SHARED = ("max_page_sharing", "merge_across_nodes")


class StoreError(Exception):
    """A store's refusal: ``errno_name`` (EINVAL, ERANGE, EBUSY) and why."""

    def __init__(self, errno_name: str, why: str) -> None:
        super().__init__(why)
        self.errno_name = errno_name
        self.why = why


def _digits(s: str, why: str) -> int:
    """_kstrtoull(s, 10): decimal digits, then at most one newline
    ("if (*s == '\\n') s++; if (*s) return -EINVAL;"); no sign, no blank;
    -ERANGE past ULLONG_MAX (_parse_integer's KSTRTOX_OVERFLOW)."""
    body = s[:-1] if s.endswith("\n") else s
    if not body or not all("0" <= c <= "9" for c in body):
        raise StoreError("EINVAL", why)
    v = int(body, 10)
    if v > ULLONG_MAX:
        raise StoreError("ERANGE", why)
    return v


def kstrtoull(raw: Any, why: str) -> int:
    """kstrtoull(s, 10): a leading '+' is skipped ("if (s[0] == '+') s++")."""
    s = str(raw)
    return _digits(s[1:] if s.startswith("+") else s, why)


def kstrtouint(raw: Any, why: str) -> int:
    """kstrtouint: kstrtoull, then -ERANGE if it does not fit an unsigned int."""
    v = kstrtoull(raw, why)
    if v > UINT_MAX:
        raise StoreError("ERANGE", why)
    return v


def kstrtoint(raw: Any, why: str) -> int:
    """kstrtoint: kstrtoll ("-" then _kstrtoull of the rest; else kstrtoull),
    then -ERANGE if it does not fit an int."""
    s = str(raw)
    v = -_digits(s[1:], why) if s.startswith("-") else kstrtoull(s, why)
    if not -INT_MAX - 1 <= v <= INT_MAX:
        raise StoreError("ERANGE", why)
    return v


def kstrtobool(raw: Any, why: str) -> int:
    """kstrtobool: the first character decides (e/y/t/1 true, d/n/f/0
    false; o then n true, o then f false), the rest is not read."""
    s = str(raw)
    c = s[:1].lower()
    if c in ("e", "y", "t", "1"):
        return 1
    if c in ("d", "n", "f", "0"):
        return 0
    if c == "o" and s[1:2].lower() in ("n", "f"):
        return int(s[1:2].lower() == "n")
    raise StoreError("EINVAL", why)


def _einval(fn: Any, raw: Any, why: str) -> int:
    """A store that answers "if (err) return -EINVAL;" whatever kstrto* said."""
    try:
        return int(fn(raw, why))
    except StoreError as e:
        raise StoreError("EINVAL", e.why) from None


def validate(name: str, raw: Any, q: Any | None) -> int | str:
    """The value 6.18's ``name``_store would write for ``raw``, or
    StoreError with its errno; ``q``: the cluster's words (state the
    store checks: the advisor, pages_shared), None to check the value only."""
    if name == "run":
        # run_store: kstrtouint, "if (err) return -EINVAL; if (flags > KSM_RUN_UNMERGE) return -EINVAL;"
        v = _einval(kstrtouint, raw, "must be 0, 1 or 2")
        if v > 2:
            raise StoreError("EINVAL", "must be 0, 1 or 2")
        return v
    if name == "pages_to_scan":
        # 6.8, 4e5fa4f5eff6: "if (ksm_advisor != KSM_ADVISOR_NONE) return -EINVAL;"
        # (the scan-time advisor owns pages_to_scan; this machine's 6.18 refuses the write too)
        if q is not None and q[K_ADVISOR_MODE] != 0:
            raise StoreError("EINVAL", "advisor_mode is scan-time: the advisor sets pages_to_scan")
        return _einval(kstrtouint, raw, f"must be a whole number 0..{UINT_MAX}")
    if name in ("sleep_millisecs", "stable_node_chains_prune_millisecs"):
        return _einval(kstrtouint, raw, f"must be a whole number of milliseconds 0..{UINT_MAX}")
    if name in ("use_zero_pages", "smart_scan"):
        return _einval(kstrtobool, raw, "must be a boolean: 1/0, y/n, on/off, ...")
    if name == "max_page_sharing":
        # kstrtoint's own errno ("if (err) return err;"), then "if (knob < 2) return -EINVAL;"
        v = kstrtoint(raw, "must be a whole number >= 2 (a KSM page is shared by 2 at least)")
        if v < 2:
            raise StoreError("EINVAL", "must be a whole number >= 2 (a KSM page is shared by 2 at least)")
        if q is not None and q[K_MAX_PAGE_SHARING] != v:
            busy(name, q)  # (the same value returns at once: "== knob) return count;")
        return v
    if name == "merge_across_nodes":
        v = kstrtoull(raw, "must be 0 or 1")   # kstrtoul: its errno as is
        if v > 1:
            raise StoreError("EINVAL", "must be 0 or 1")
        if q is not None and q[K_MERGE_ACROSS_NODES] != v:
            busy(name, q)
        return v
    if name == "advisor_mode":
        # sysfs_streq: the word, optionally followed by one newline
        s = str(raw)
        s = s[:-1] if s.endswith("\n") else s
        if s not in ADVISOR_MODES:
            raise StoreError("EINVAL", f"must be one of: {', '.join(ADVISOR_MODES)}")
        return s
    if name == "advisor_max_cpu":
        # kstrtoul into an unsigned long, stored in "static unsigned int ksm_advisor_max_cpu"
        return _einval(kstrtoull, raw, "must be a whole number (percent)") & UINT_MAX
    if name in ("advisor_min_pages_to_scan", "advisor_max_pages_to_scan"):
        return _einval(kstrtoull, raw, "must be a whole number of pages")
    if name == "advisor_target_scan_time":
        v = _einval(kstrtoull, raw, "must be a whole number of seconds >= 1")
        if v < 1:
            raise StoreError("EINVAL", "must be a whole number of seconds >= 1")
        return v
    raise KeyError(name)


def busy(name: str, q: Any) -> None:
    """max_page_sharing_store, merge_across_nodes_store: "if
    (ksm_pages_shared || remove_all_stable_nodes()) err = -EBUSY;" under
    ksm_thread_mutex.  (remove_all_stable_nodes finds nothing to keep once
    pages_shared is 0 here: a stable node of uksm always has a page.)"""
    if q[K_PAGES_SHARED]:
        raise StoreError("EBUSY", f"pages_shared is {q[K_PAGES_SHARED]}: {name} can change only "
                                  f"with no KSM page left (run=2 first)")


def store(name: str, value: int | str, q: Any) -> int | str:
    """Write a validated ``value`` with the store's side effects; returns
    the previous value (as it reads).  The caller holds ksm_thread_mutex
    for the BUSY_WHILE_SHARED knobs and has re-checked them under it
    (``validate`` with ``q``)."""
    if name == "advisor_mode":
        prev = ADVISOR_MODES[q[K_ADVISOR_MODE]]
        mode = ADVISOR_MODES.index(str(value))
        if mode != q[K_ADVISOR_MODE]:
            q[K_ADVISOR_MODE] = mode
            # set_advisor_defaults: none puts DEFAULT_PAGES_TO_SCAN back,
            # scan-time starts from advisor_min_pages_to_scan
            q[K_PAGES_TO_SCAN] = DEFAULT_PAGES_TO_SCAN if mode == 0 else q[K_ADVISOR_MIN_PAGES_TO_SCAN]
        return prev
    idx = KNOBS_618.get(name)
    if idx is None:
        idx = {"pages_to_scan": K_PAGES_TO_SCAN, "sleep_millisecs": K_SLEEP_MS}[name]
    prev_v = int(q[idx])
    q[idx] = int(value)
    return prev_v


__all__ = ["BUSY_WHILE_SHARED", "KNOBS_618", "StoreError", "busy", "kstrtobool", "kstrtoint",
           "kstrtouint", "kstrtoull", "store", "validate"]
