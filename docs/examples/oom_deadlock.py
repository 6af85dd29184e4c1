"""The seed's deadlock ("ksm: fix oom deadlock"): run=2 unmerges while
memory is short; the OOM killer picks the task being unmerged.  Under
``legacy`` its __ksm_exit waits for ksm_thread_mutex, which the writer of
run=2 holds (run_store unmerges under it) while it waits for the memory
only that exit would free.  Under ``seed`` the victim frees its pages first
and the unmerge completes.

The machine runs on a controlled schedule drawn from a seed
(``deterministic=True``): the race is reached by the schedule, not by
timing, and the deadlock is seen the moment every process is blocked --
no watchdog timeout to wait out; the same seed replays the same run.
Usage: python oom_deadlock.py [legacy|seed]"""
import sys

import uksm


def unmerge_under_pressure(policy: str, seed: int = 1) -> str:
    with uksm.Machine(exit_policy=policy, frames=256, deterministic=True, seed=seed) as m:
        tasks = [m.task(pages=8) for _ in range(3)]
        for t in tasks:
            t.fill(0x5A)                                   # 24 identical pages
        m.wait_merged()                                    # 1 KSM page left
        m.ksm["mem_limit"] = m.ksm["frames_used"] + 4      # then memory runs short
        try:
            m.ksm["run"] = 2                               # run_store: break_cow on every page
            outcome = f"unmerged, {m.ksm['pages_shared']} pages still shared"
        except uksm.HungTask as e:
            outcome = "deadlock: " + " / ".join(e.chain)
    assert m.report is not None
    fs = m.report["fsck"]
    print(f"{policy}: {outcome}; report status {m.report['status']}, oom_killed "
          f"{m.report['workers']['oom_killed']}, fsck {'clean' if fs['ok'] else fs['errors'][0]}, "
          f"{m.report['steps']} steps")
    return outcome


if __name__ == "__main__":
    policies = sys.argv[1:] or ["legacy", "seed"]
    results = {p: unmerge_under_pressure(p) for p in policies}
    if "legacy" in results:
        assert results["legacy"].startswith("deadlock"), results
        assert "ksm_thread_mutex" in results["legacy"], results
    if "seed" in results:
        assert results["seed"].startswith("unmerged"), results
