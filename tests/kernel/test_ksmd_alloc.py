"""ksmd allocates the new KSM page, as 2.6.32's try_to_merge_two_pages did
(issue 22, item 5; 2.6.32.67 mm/ksm.c 822-871): a failed allocation merges
nothing, a failed second merge breaks COW on the first page, a kill at the
allocation is recovered, and the allocation meets the OOM killer holding
ksm_thread_mutex -- the seed's deadlock under ``legacy``, none under
``seed``.

Every run here is controlled (uksm.kernel.sched): the windows are reached
by a schedule, and each control shows from its trace that it reached the
window.
"""
from __future__ import annotations

import pytest

import uksm
from races import DEFAULT, default_run, steps, until
from uksm import logs
from uksm.kernel import sched
from uksm.scenarios import SCENARIOS

# the first schedule `uksm explore --scenario oom-merge --exit-policy legacy` finds
OOM_MERGE = "uksm2:oom-merge:{policy}:2.6.32:-:0:0:race:-:26"


def two_equal_tasks(m: uksm.Machine) -> tuple[uksm.Task, uksm.Task]:
    a, b = m.task(pages=1), m.task(pages=1)
    a.fill(1)
    b.fill(1)
    return a, b


def held_at_the_allocation(m: uksm.Machine) -> tuple[uksm.Task, uksm.Task]:
    """Two equal pages checksummed; ksmd's next pass is held at the KSM
    page's allocation (a delay point: under the scheduler a barrier,
    released when nothing else can run) when this returns."""
    a, b = two_equal_tasks(m)
    m.wait_full_scans(1)
    m.arm("ksmd_alloc_kpage", delay_ms=1)
    m.wait(lambda: m.armed() is None, what="ksmd at the allocation")
    return a, b


def held_step(st: list[tuple[str, str]]) -> int:
    return next(i for i, (p, x) in enumerate(st) if p == "ksmd" and "-> blocked on a delay point" in x)


@pytest.mark.timeout(60)
def test_a_failed_allocation_merges_nothing_and_leaks_nothing():
    """fail_page_alloc at the KSM page's allocation: that pass merges
    nothing ("if (!kpage) return err;"), no frame is left behind, fsck is
    clean; the next pass merges."""
    seen = {}

    def script(m: uksm.Machine) -> None:
        a, b = two_equal_tasks(m)
        m.arm("ksmd_alloc_kpage", fail=True)
        seen["failed"] = m.wait_full_scans(2)   # checksums, then the merge that fails
        seen["armed"] = m.armed()
        seen["frames"] = m.ksm["frames_used"]
        seen["fsck"] = m.fsck()["ok"]
        seen["next"] = m.wait_full_scans(1)
        m.wait(lambda: m.ksm["frames_used"] == 1, what="the merged-away frame freed")
        a.write(0, b"a")   # both COW: the KSM page's last reference goes
        b.write(0, b"b")
        seen["fsck_after_cow"] = m.fsck()["ok"]   # ksmd's row holds no stale in-flight kpage
    r = default_run(script)
    assert not r.failures and r.status == 0, [(f["finding"], f["detail"]) for f in r.failures]
    assert seen["armed"] is None   # it fired
    # the tree page stays in the unstable tree, this one in none; both pages and nothing more in use
    assert seen["failed"] == {"pages_shared": 0, "pages_sharing": 0, "pages_unshared": 1,
                              "pages_volatile": 1}, seen
    assert seen["frames"] == 2 and seen["fsck"] and seen["fsck_after_cow"], seen
    assert (seen["next"]["pages_shared"], seen["next"]["pages_sharing"]) == (1, 1), seen


@pytest.mark.timeout(60)
def test_the_second_merge_failing_breaks_cow_on_the_first(tmp_path):
    """ksmd held at the allocation (a delay point: a barrier) while the
    tree page is written: the first page is merged into the new KSM page,
    the second no longer matches, and the KSM page with one pte is broken
    ("If that fails, we have a ksm page with only one pte pointing to it:
    so break it.")."""
    seen = {}

    def script(m: uksm.Machine) -> None:
        a, _b = held_at_the_allocation(m)
        a.write(0, b"\7" * 64)   # the unstable tree's page changes inside the window
        seen["after"] = m.wait_full_scans(1)
        m.wait(lambda: m.ksm["frames_used"] == 2, what="the KSM page freed")
        seen["fsck"] = m.fsck()["ok"]
    r = uksm.replay(script, DEFAULT, log_dir=str(tmp_path))
    assert not r.failures and r.status == 0, [(f["finding"], f["detail"]) for f in r.failures]
    st = steps(r.trace)
    held = held_step(st)
    assert any(p == "t1" and "lock pte_lock:mm1" in x for p, x in until(st, held, "ksmd")), r.trace
    # the break is the same batch's, before ksmd sleeps (not the next pass's, which would break
    # a KSM page outside the stable tree too)
    batch = [x for p, x in st[held:] if p == "ksmd"]
    end = next(i for i, x in enumerate(batch) if "-> blocked on sleep" in x)
    assert any("via kp:ksmd_break_ksm_window" in x for x in batch[:end]), r.trace
    assert (seen["after"]["pages_shared"], seen["after"]["pages_sharing"]) == (0, 0) and seen["fsck"], seen
    evs = list(logs.iter_events(str(tmp_path)))
    assert [e["mm"] for e in evs if e["event"] == "cow_break" and e["by"] == "ksmd"] == [2], evs
    assert not [e for e in evs if e["event"] == "merge"]


@pytest.mark.timeout(60)
def test_a_kill_at_the_allocation_is_recovered():
    """The kill point kills the owner of the page being merged; the
    recovery reaps it, ksmd's KSM page is left to the other task alone and
    broken by the next pass; nothing leaks, the other task's data holds."""
    seen = {}

    def script(m: uksm.Machine) -> None:
        a, _b = two_equal_tasks(m)
        m.wait_full_scans(1)
        m.arm("ksmd_alloc_kpage")
        seen["k"] = m.wait_full_scans(2)
        seen["stats"] = m.stats()
        seen["data"] = a.read(0, 4096)
        seen["fsck"] = m.fsck()["ok"]
    r = default_run(script)
    assert not r.failures and r.status == 0, [(f["finding"], f["detail"]) for f in r.failures]
    assert any("via kp:ksmd_alloc_kpage; signal 9 to t2" in x for x in r.trace), r.trace
    s = seen["stats"]
    assert (s["killed"], s["kill_points_hit"], s["recoveries"], s["reaped"]) == (1, 1, 1, 1), s
    assert seen["data"] == b"\1" * 4096 and seen["fsck"], seen
    assert (seen["k"]["pages_shared"], seen["k"]["pages_sharing"]) == (0, 0), seen


@pytest.mark.timeout(60)
def test_the_first_page_leaving_puts_kpage_back():
    """The first page's task exits while ksmd is held at the allocation
    (its exit waits for the mmap_sem ksmd holds): ksmd finds it exiting
    ("if (ksm_test_exit(mm1)) goto out;"), merges nothing and puts the
    unmapped kpage back ("put_page(kpage)"); nothing stays in flight."""
    seen = {}

    def script(m: uksm.Machine) -> None:
        a, b = held_at_the_allocation(m)
        b.exit()
        seen["k"] = m.wait_full_scans(1)
        a.write(0, b"a")
        seen["fsck"] = m.fsck()["ok"]
        seen["frames"] = m.ksm["frames_used"]
    r = default_run(script)
    assert not r.failures and r.status == 0, [(f["finding"], f["detail"]) for f in r.failures]
    st = steps(r.trace)
    held = held_step(st)
    assert any(p == "t2" for p, _x in until(st, held, "ksmd")), r.trace   # the exit began in the window
    assert seen["fsck"] and seen["frames"] == 1 and seen["k"]["pages_shared"] == 0, seen


def oom_window(trace: list[str]) -> bool:
    """ksmd, waiting for a frame for the KSM page, OOM-killed t1, and t1's
    exit ran (to its end, or until it blocked) before ksmd went on."""
    st = steps(trace)
    return any(p == "ksmd" and "-> blocked on free frames" in x and "signal 10 to t1" in x
               and any(q == "t1" for q, _y in until(st, i, "ksmd"))
               for i, (p, x) in enumerate(st))


@pytest.mark.timeout(60)
def test_ksmd_allocation_meets_the_oom_killer_legacy_deadlocks_seed_does_not():
    """The seed's first sentence: ksmd allocating a page while it holds
    ksm_thread_mutex.  Under ``legacy`` the OOM victim's __ksm_exit waits
    for that mutex and ksmd for the victim's memory; under ``seed`` (and
    ``shipped``) the victim exits without the mutex and ksmd gets a frame."""
    sc = SCENARIOS["oom-merge"]
    bad = uksm.replay(sc.fn, OOM_MERGE.format(policy="legacy"), name=sc.name, **sc.options)
    assert [f["finding"] for f in bad.failures] == ["deadlock"], bad.failures
    chain = bad.failures[0]["chain"]
    assert "waits for ksm_thread_mutex, held by ksmd" in chain[0] and "free frames" in chain[1], chain
    assert oom_window(bad.trace)
    for policy in ("seed", "shipped"):
        ok = uksm.replay(sc.fn, OOM_MERGE.format(policy=policy), strict=False, name=sc.name, **sc.options)
        assert not ok.failures and ok.status == 0, (policy, ok.failures)
        assert oom_window(ok.trace), (policy, ok.trace)   # the window was reached
        st = steps(ok.trace)
        assert any(p == "t1" and x.endswith("-> exit") for p, x in st), ok.trace


def test_only_the_allocation_can_be_made_to_fail():
    m = uksm.Machine.__new__(uksm.Machine)
    with pytest.raises(ValueError, match="ksmd_alloc_kpage"):
        m.arm("ksmd_scan_wrap", fail=True)


@pytest.mark.timeout(60)
def test_ksmd_killed_with_its_kpage_in_flight_or_mapped_once():
    """A SIGKILL of ksmd inside try_to_merge_two_pages, at the two commit
    points: kpage allocated and copied but mapped nowhere (in flight on
    ksmd's row: the recovery's rebuild frees it), and kpage mapped by the
    first page alone (a KSM page outside any stable tree: the restarted
    ksmd breaks it).  Either way fsck is clean, nothing leaks, the data
    holds, and the pages merge again."""
    seen: dict[str, object] = {}

    def script(m: uksm.Machine) -> None:
        a, b = two_equal_tasks(m)
        m.wait(lambda: m.ksm["pages_sharing"] == 1 and m.ksm["frames_used"] == 1, what="merged again")
        seen["data"] = (a.read(0, 4096), b.read(0, 4096))
        seen["fsck"] = m.fsck()["ok"]
        seen["recoveries"] = m.stats()["recoveries"]
    free_run = "uksm2:script:seed:2.6.32:-:0:1:start:-:-1"   # SIGKILL choices allowed, none taken
    st = steps(uksm.replay(script, free_run).trace)
    at = next(i for i, (p, x) in enumerate(st) if p == "ksmd" and x.endswith("-> kp:ksmd_alloc_kpage"))
    # ksmd parked at merge_into_kpage's pte lock (kpage in flight), then at the tree page's
    # mmap_sem (kpage mapped by the first page)
    for step, where in ((at + 2, "lock pte_lock:mm2"), (at + 3, "lock mmap_sem:mm1")):
        assert st[step - 1][1].endswith("-> " + where), st[step - 1]
        seen.clear()
        r = uksm.replay(script, free_run.replace(":-:-1", f":{step}.k0.{sched.CODE['lock']}:-1"))
        assert not r.failures and r.status == 0, [(f["finding"], f["detail"]) for f in r.failures]
        assert any(f"KIL ksmd           SIGKILL at {where}" in x for x in r.trace), r.trace
        assert seen == {"data": (b"\1" * 4096,) * 2, "fsck": True, "recoveries": 1}, seen
