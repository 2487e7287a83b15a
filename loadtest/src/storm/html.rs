//! The self-contained HTML report: inline SVG charts drawn here (no
//! JavaScript, no external CSS, fonts or images), so it opens in a browser
//! without network access.

use std::fmt::Write as _;

use super::report::{opt, RunReport, StormResults};

const COLORS: [&str; 4] = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd"];
const W: f64 = 640.0;
const H: f64 = 300.0;
const ML: f64 = 64.0;
const MR: f64 = 16.0;
const MT: f64 = 30.0;
const MB: f64 = 44.0;

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// A "nice" axis maximum and tick step for `max`.
fn nice(max: f64) -> (f64, f64) {
    let max = if max.is_finite() && max > 0.0 {
        max
    } else {
        1.0
    };
    let raw = max / 5.0;
    let mag = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 2.5, 5.0, 10.0]
        .iter()
        .map(|m| m * mag)
        .find(|s| *s >= raw)
        .unwrap_or(10.0 * mag);
    ((max / step).ceil() * step, step)
}

fn num(v: f64) -> String {
    if v == 0.0 {
        "0".into()
    } else if v.abs() >= 100.0 || v.fract() == 0.0 {
        format!("{v:.0}")
    } else if v.abs() >= 1.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

pub struct Series<'a> {
    pub name: &'a str,
    pub points: Vec<(f64, f64)>,
}

/// A line chart as an `<svg>` element with `id`.
pub fn line_chart(
    id: &str,
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[Series],
) -> String {
    let xmax = series
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.0))
        .fold(0.0, f64::max);
    let ymax = series
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.1))
        .fold(0.0, f64::max);
    let (xmax, xstep) = nice(xmax);
    let (ymax, ystep) = nice(ymax);
    let pw = W - ML - MR;
    let ph = H - MT - MB;
    let x = |v: f64| ML + v / xmax * pw;
    let y = |v: f64| MT + ph - v / ymax * ph;
    let mut s = String::new();
    let _ = write!(
        s,
        r#"<svg class="chart" id="{id}" xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" role="img" aria-label="{t}">"#,
        t = esc(title)
    );
    let _ = write!(
        s,
        r#"<text x="{}" y="18" text-anchor="middle" class="title">{}</text>"#,
        W / 2.0,
        esc(title)
    );
    // Grid and ticks.
    let mut v = 0.0;
    while v <= ymax + ystep / 2.0 {
        let _ = write!(
            s,
            r##"<line x1="{ML}" x2="{}" y1="{yy:.1}" y2="{yy:.1}" stroke="#ddd"/><text x="{}" y="{:.1}" text-anchor="end" class="tick">{}</text>"##,
            W - MR,
            ML - 6.0,
            y(v) + 4.0,
            num(v),
            yy = y(v)
        );
        v += ystep;
    }
    let mut v = 0.0;
    while v <= xmax + xstep / 2.0 {
        let _ = write!(
            s,
            r##"<line x1="{xx:.1}" x2="{xx:.1}" y1="{MT}" y2="{}" stroke="#eee"/><text x="{xx:.1}" y="{}" text-anchor="middle" class="tick">{}</text>"##,
            MT + ph,
            MT + ph + 16.0,
            num(v),
            xx = x(v)
        );
        v += xstep;
    }
    let _ = write!(
        s,
        r##"<rect x="{ML}" y="{MT}" width="{pw}" height="{ph}" fill="none" stroke="#888"/><text x="{}" y="{}" text-anchor="middle" class="axis">{}</text><text transform="translate(14,{}) rotate(-90)" text-anchor="middle" class="axis">{}</text>"##,
        ML + pw / 2.0,
        H - 6.0,
        esc(x_label),
        MT + ph / 2.0,
        esc(y_label)
    );
    for (i, se) in series.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let pts: Vec<String> = se
            .points
            .iter()
            .filter(|p| p.0.is_finite() && p.1.is_finite())
            .map(|p| format!("{:.1},{:.1}", x(p.0), y(p.1)))
            .collect();
        let _ = write!(
            s,
            r#"<polyline class="series" data-series="{n}" fill="none" stroke="{color}" stroke-width="2" points="{}"/>"#,
            pts.join(" "),
            n = esc(se.name)
        );
        let lx = ML + 10.0 + 170.0 * i as f64;
        let _ = write!(
            s,
            r#"<rect x="{lx}" y="{}" width="12" height="3" fill="{color}"/><text x="{}" y="{}" class="legend">{}</text>"#,
            MT + 8.0,
            lx + 16.0,
            MT + 13.0,
            esc(se.name)
        );
    }
    s.push_str("</svg>");
    s
}

fn completions(r: &RunReport) -> Vec<(f64, f64)> {
    let mut v = vec![(0.0, 0.0)];
    v.extend(
        r.completions
            .iter()
            .enumerate()
            .map(|(i, &c)| ((i + 1) as f64 * r.bin_s, c as f64)),
    );
    v
}

fn throughput(r: &RunReport) -> Vec<(f64, f64)> {
    r.throughput_hosts_per_s
        .iter()
        .enumerate()
        .map(|(i, &c)| ((i as f64 + 0.5) * r.bin_s, c))
        .collect()
}

/// The whole page.
pub fn render(res: &StormResults) -> String {
    let mut s = String::new();
    let title = format!(
        "pxemesh boot storm: {}",
        res.runs
            .iter()
            .map(|r| format!("{} ({} hosts, {})", r.label, r.hosts, r.profile.as_str()))
            .collect::<Vec<_>>()
            .join(" vs ")
    );
    let _ = write!(
        s,
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{}</title>\n<style>\n\
         body{{font-family:sans-serif;margin:24px;color:#222}} table{{border-collapse:collapse;margin:12px 0}}\n\
         td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}} th{{background:#f4f4f4}} td:first-child,th:first-child{{text-align:left}}\n\
         .charts{{display:flex;flex-wrap:wrap;gap:16px}} svg.chart{{background:#fff;border:1px solid #eee}}\n\
         .title{{font-size:14px;font-weight:bold}} .tick{{font-size:11px;fill:#555}} .axis{{font-size:12px}} .legend{{font-size:12px}}\n\
         .bad{{color:#b00}} pre{{white-space:pre-wrap;word-break:break-all}}\n</style></head><body>\n<h1>{}</h1>\n<p>{} &middot; {} &middot; {}</p>\n",
        esc(&title),
        esc(&title),
        esc(&res.started_utc),
        esc(&res.machine),
        esc(&res.tool)
    );
    // Summary table.
    s.push_str("<h2>Summary</h2>\n<table id=\"summary\"><tr><th></th>");
    for r in &res.runs {
        let _ = write!(s, "<th>{}</th>", esc(&r.label));
    }
    s.push_str("</tr>\n");
    let mut row = |name: &str, f: &dyn Fn(&RunReport) -> String| {
        let _ = write!(s, "<tr><td>{}</td>", esc(name));
        for r in &res.runs {
            let _ = write!(s, "<td>{}</td>", esc(&f(r)));
        }
        s.push_str("</tr>\n");
    };
    row("profile", &|r| r.profile.as_str().into());
    row("arrival", &|r| r.arrival.describe());
    row("hosts done / total", &|r| {
        format!("{} / {}", r.completed, r.hosts)
    });
    row("failed (timeouts)", &|r| {
        format!("{} ({})", r.failed, r.timeouts)
    });
    row("time to last host (s)", &|r| opt(r.time_to_last_host_s));
    row("hosts/s", &|r| format!("{:.1}", r.hosts_per_s));
    row("payload MiB/s", &|r| format!("{:.1}", r.mib_per_s));
    for p in ["dhcp", "tftp", "http", "total"] {
        row(&format!("{p} p50 / p90 / p99 / max (ms)"), &|r| {
            let l = r.phase(p);
            if l.count == 0 {
                "-".into()
            } else {
                format!("{:.1} / {:.1} / {:.1} / {:.1}", l.p50, l.p90, l.p99, l.max)
            }
        });
    }
    row("retries dhcp / tftp / http", &|r| {
        format!(
            "{} / {} / {}",
            r.retries.dhcp, r.retries.tftp, r.retries.http
        )
    });
    row("TFTP blksize / windowsize", &|r| {
        format!(
            "{} / {}",
            r.settings.tftp_blksize, r.settings.tftp_windowsize
        )
    });
    s.push_str("</table>\n");
    if let Some(c) = &res.comparison {
        let _ = write!(
            s,
            "<h2>Ratios ({} / {})</h2>\n<table id=\"ratios\"><tr><th>time to last host</th><th>total p50</th><th>total p99</th><th>hosts/s</th></tr>\
             <tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr></table>\n",
            esc(&c.ours),
            esc(&c.baseline),
            opt(c.time_to_last_host_ratio),
            opt(c.total_p50_ratio),
            opt(c.total_p99_ratio),
            opt(c.hosts_per_s_ratio)
        );
    }
    for r in &res.runs {
        if r.failures_by_cause.is_empty() {
            continue;
        }
        let _ = write!(
            s,
            "<h2 class=\"bad\">{}: failures by cause</h2>\n<table class=\"failures\"><tr><th>phase: cause</th><th>hosts</th></tr>",
            esc(&r.label)
        );
        for (c, n) in &r.failures_by_cause {
            let _ = write!(s, "<tr><td>{}</td><td>{n}</td></tr>", esc(c));
        }
        s.push_str("</table>\n");
    }
    s.push_str("<h2>Charts</h2>\n<div class=\"charts\">\n");
    let series = |f: &dyn Fn(&RunReport) -> Vec<(f64, f64)>| -> Vec<Series> {
        res.runs
            .iter()
            .map(|r| Series {
                name: &r.label,
                points: f(r),
            })
            .collect()
    };
    s.push_str(&line_chart(
        "chart-completions",
        "Hosts done over time",
        "seconds since start",
        "hosts done",
        &series(&completions),
    ));
    s.push_str(&line_chart(
        "chart-throughput",
        "Throughput (hosts done per second)",
        "seconds since start",
        "hosts/s",
        &series(&throughput),
    ));
    for p in ["total", "dhcp", "tftp", "http"] {
        if res.runs.iter().all(|r| r.phase(p).count == 0) {
            continue;
        }
        s.push_str(&line_chart(
            &format!("chart-latency-{p}"),
            &format!("Latency distribution: {p}"),
            "milliseconds",
            "percentile",
            &series(&|r| r.phase(p).cdf.iter().map(|&(q, ms)| (ms, q)).collect()),
        ));
    }
    s.push_str("\n</div>\n<h2>Settings</h2>\n<pre>");
    for r in &res.runs {
        let _ = writeln!(
            s,
            "{}: {}",
            esc(&r.label),
            esc(&serde_json::to_string(&r.settings).unwrap_or_default())
        );
    }
    s.push_str("</pre>\n</body></html>\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nice_axes() {
        assert_eq!(nice(0.0), (1.0, 0.2));
        assert_eq!(nice(9.3), (10.0, 2.0));
        assert_eq!(nice(1000.0), (1000.0, 200.0));
        let svg = line_chart(
            "c",
            "t <x>",
            "x",
            "y",
            &[Series {
                name: "a",
                points: vec![(0.0, 0.0), (1.0, 2.0)],
            }],
        );
        assert!(svg.starts_with("<svg") && svg.ends_with("</svg>"));
        assert!(svg.contains("t &lt;x&gt;") && svg.contains("<polyline"));
    }
}
