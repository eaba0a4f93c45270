//! The distributed graph (frontend, 2 decode and 2 prefill workers on the mock engine, real NATS
//! and etcd) under load, and under each fault the reliability issue names: 64 streams for 60 s
//! complete with no hang, no growth of any process's RSS after warm-up and no KV block left in
//! use, the streams past `--max-inflight` queued rather than refused; kill -9 of a decode worker loses no
//! request with `--migration-limit 1`, and without migration ends only its own streams, each with
//! an error event and `[DONE]`; kill -9 of a prefill worker loses none; a SIGSTOPped worker's
//! streams time out with an error and it leaves routing; NATS and etcd restarts fail requests
//! fast and clearly or not at all, and service resumes. After every fault, no request was
//! answered twice and the survivors hold no KV block. The runs are serialized: each has the
//! machine to itself.

use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Duration;

use baton_benches::soak::{self, Ending, Fault, SoakConfig, SoakReport};

static SERIAL: Mutex<()> = Mutex::new(());

fn config(name: &str, streams: usize, secs: u64) -> SoakConfig {
    let baton = PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../target/release/baton"
    ));
    assert!(
        baton.is_file(),
        "{} is missing: build it first (`make build`)",
        baton.display()
    );
    let work = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("soak-{name}-{}", std::process::id()));
    SoakConfig::new(baton, work, streams, Duration::from_secs(secs))
}

/// Runs the soak alone, keeps its JSON beside the logs, and checks what holds after any run:
/// nothing hung, nothing answered twice, no KV block left on a survivor, every survivor said
/// what it held.
fn soak(config: &SoakConfig) -> SoakReport {
    let _alone = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let report = soak::run(config).unwrap_or_else(|e| panic!("the soak could not run: {e}"));
    let json = serde_json::to_string_pretty(&report).unwrap();
    std::fs::write(config.work.join("report.json"), &json).unwrap();
    let at = config.work.display();
    assert!(report.requests > 0, "{json}");
    assert_eq!(report.hung, 0, "no request hangs ({at}): {json}");
    assert_eq!(
        report.answered_twice, 0,
        "no request answered twice ({at}): {json}"
    );
    assert_eq!(
        report.leaked_blocks(),
        0,
        "no KV block left in use ({at}): {json}"
    );
    assert!(
        report.silent_workers().is_empty(),
        "every surviving worker reports its KV blocks when it stops ({at}): {json}"
    );
    report
}

/// The decode worker struck by the run's one fault left the frontend's routing within the lease
/// TTL (plus the frontend's watch and poll delay); the seconds it took.
fn left_routing(r: &SoakReport, c: &SoakConfig) -> f64 {
    let left = r.faults[0].left_routing_after_s.unwrap();
    assert!(
        left <= c.lease_ttl as f64 + 3.0,
        "the worker leaves routing within the lease TTL ({} s): {left} s",
        c.lease_ttl
    );
    left
}

fn failures_json(r: &SoakReport) -> String {
    serde_json::to_string_pretty(&r.failures).unwrap()
}

#[test]
fn sixty_four_streams_for_a_minute_complete_without_growth_or_leaks() {
    let mut c = config("plain", 64, 60);
    // Past it requests wait in the frontend's admission queue (`--max-queued`, default 1024).
    c.max_inflight = 48;
    let r = soak(&c);
    assert_eq!(
        r.failed,
        0,
        "every request completes: {}",
        failures_json(&r)
    );
    assert!(r.completed >= 64, "{}", r.completed);
    assert_eq!(
        r.rejected_503, 0,
        "64 streams over --max-inflight 48 queue for a slot instead of getting 503s"
    );
    assert!(
        r.remote_prefills > 0.0,
        "long prompts went to the prefill workers"
    );
    for p in &r.processes {
        assert!(
            !p.grew(0.25, 24.0),
            "{} grew after warm-up: {:?} → {:?} MiB",
            p.name,
            p.rss_warm_mib,
            p.rss_end_mib
        );
    }
}

#[test]
fn a_killed_decode_worker_loses_no_request_with_migration() {
    let mut c = config("kill-decode-migrate", 24, 20);
    c.faults = vec![(Duration::from_secs(6), Fault::KillDecode)];
    let r = soak(&c);
    assert_eq!(
        r.failed,
        0,
        "migration saves every stream: {}",
        failures_json(&r)
    );
    left_routing(&r, &c);
}

#[test]
fn without_migration_only_the_killed_workers_streams_fail_each_with_an_error_and_done() {
    let mut c = config("kill-decode", 24, 20);
    c.migration_limit = 0;
    c.faults = vec![(Duration::from_secs(6), Fault::KillDecode)];
    let r = soak(&c);
    let killed_at = r.faults[0].at_s;
    assert!(r.failed > 0, "streams were running on the killed worker");
    for f in &r.failures {
        assert!(
            f.failed_clearly() && f.ending == Ending::ErrorEvent,
            "its stream ends with an error event and [DONE]: {f:?}"
        );
        assert!(
            f.start_s < killed_at,
            "only streams running at the kill fail: {f:?}"
        );
    }
    assert!(r.completed > 0);
    left_routing(&r, &c);
}

#[test]
fn a_killed_prefill_worker_loses_no_request() {
    let mut c = config("kill-prefill", 24, 20);
    c.long_every = 2;
    c.faults = vec![(Duration::from_secs(6), Fault::KillPrefill)];
    let r = soak(&c);
    assert_eq!(r.failed, 0, "{}", failures_json(&r));
    assert!(r.remote_prefills > 0.0);
}

#[test]
fn a_stalled_decode_worker_times_out_its_streams_and_leaves_routing() {
    let mut c = config("stop-decode", 24, 24);
    c.migration_limit = 0;
    c.faults = vec![(Duration::from_secs(6), Fault::StopDecode)];
    let r = soak(&c);
    let fault = &r.faults[0];
    let left = left_routing(&r, &c);
    assert!(r.failed > 0, "its streams end rather than hang");
    for f in &r.failures {
        assert!(f.failed_clearly(), "with an error: {f:?}");
        // One sent to it after it stalled waits for an acceptance that never comes; when its
        // lease ends the router sends it elsewhere (a stream that began cannot move: no
        // migration here).
        assert!(
            f.content_chunks > 0,
            "only streams that had begun fail; one waiting to be accepted moves: {f:?}"
        );
        assert!(
            f.start_s < fault.at_s + left + 1.0,
            "requests after it left routing complete: {f:?}"
        );
        assert!(
            f.end_s - f.start_s <= (c.stream_timeout * 3) as f64 + 5.0,
            "a stalled stream times out (--stream-timeout {} s) rather than waiting: {f:?}",
            c.stream_timeout
        );
    }
}

#[test]
fn nats_and_etcd_restarts_fail_fast_and_clearly_or_not_at_all_and_service_resumes() {
    let mut c = config("restart-infra", 24, 30);
    c.faults = vec![
        (Duration::from_secs(6), Fault::RestartNats),
        (Duration::from_secs(16), Fault::RestartEtcd),
    ];
    let r = soak(&c);
    let last = r.faults[1].at_s + c.outage.as_secs_f64();
    for f in &r.failures {
        assert!(
            f.failed_clearly(),
            "a failure during an outage is clear: {f:?}"
        );
        assert!(
            f.end_s - f.start_s <= (c.stream_timeout * 2) as f64 + c.outage.as_secs_f64() + 5.0,
            "and fast: {f:?}"
        );
        assert!(f.start_s < last + 10.0, "service resumes: {f:?}");
    }
    assert!(
        r.logs
            .iter()
            .any(|l| l.ending == Ending::Completed && l.start_s > last + 2.0),
        "requests after both restarts complete"
    );
}
