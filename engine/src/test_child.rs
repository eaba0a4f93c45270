//! Tests that measure the whole process (page faults, threads) run their measurement in a child
//! process of their own: the other tests of the binary allocate and start threads beside them.

use std::process::Command;

/// Runs this test binary's test `test` alone with `env` set (and `GLIBC_TUNABLES` unset, so the
/// allocator is glibc's default), and returns the number it printed after `key=`.
pub fn measure_in_child(test: &str, env: (&str, &str), key: &str) -> i64 {
    let exe = std::env::current_exe().expect("test binary");
    let out = Command::new(exe)
        .args(["--exact", test, "--nocapture", "--test-threads=1"])
        .env(env.0, env.1)
        .env_remove("GLIBC_TUNABLES")
        .output()
        .expect("start the child");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "child failed: {text}");
    let prefix = format!("{key}=");
    text.lines()
        // libtest prints the test's name on the same line before its output.
        .find_map(|l| l.split_once(prefix.as_str()).map(|(_, n)| n))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("no `{key}` from the child: {text}"))
}
