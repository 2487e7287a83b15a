//! Live progress on a terminal: one bar per phase (hosts past it), with rate
//! and ETA. Hidden when stderr is not a TTY or progress is off.

use std::io::IsTerminal;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use tokio_util::sync::CancellationToken;

use super::{Live, StormConfig};

pub struct Progress {
    bars: Vec<ProgressBar>,
    live: Arc<Live>,
    task: Option<tokio::task::JoinHandle<()>>,
    stop: CancellationToken,
}

impl Progress {
    pub fn start(
        cfg: &StormConfig,
        label: &str,
        live: Arc<Live>,
        stop: CancellationToken,
    ) -> Progress {
        let stop = stop.child_token();
        if !cfg.progress || !std::io::stderr().is_terminal() {
            return Progress {
                bars: Vec::new(),
                live,
                task: None,
                stop,
            };
        }
        let multi = MultiProgress::with_draw_target(ProgressDrawTarget::stderr_with_hz(5));
        let n = cfg.fleet.count as u64;
        let style = ProgressStyle::with_template(
            "{prefix:>22} [{bar:30}] {pos:>6}/{len} {per_sec:>10} eta {eta} {msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ");
        let names = [
            format!("{label} arrived"),
            "past dhcp".to_string(),
            "past tftp".to_string(),
            "done".to_string(),
        ];
        let bars: Vec<ProgressBar> = names
            .into_iter()
            .map(|name| {
                let b = multi.add(ProgressBar::new(n));
                b.set_style(style.clone());
                b.set_prefix(name);
                b
            })
            .collect();
        let (b2, s2, l2) = (bars.clone(), stop.clone(), live.clone());
        let task = tokio::spawn(async move {
            loop {
                update(&b2, &l2);
                tokio::select! {
                    _ = s2.cancelled() => break,
                    _ = tokio::time::sleep(Duration::from_millis(200)) => {}
                }
            }
        });
        Progress {
            bars,
            live,
            task: Some(task),
            stop,
        }
    }

    pub fn finish(mut self) {
        self.stop.cancel();
        if let Some(t) = self.task.take() {
            t.abort();
        }
        update(&self.bars, &self.live);
        for b in &self.bars {
            b.abandon();
        }
    }
}

fn update(bars: &[ProgressBar], l: &Live) {
    let [arrived, dhcp, tftp, done] = bars else {
        return;
    };
    arrived.set_position(l.arrived.load(Ordering::Relaxed));
    dhcp.set_position(l.past_dhcp.load(Ordering::Relaxed));
    tftp.set_position(l.past_tftp.load(Ordering::Relaxed));
    done.set_position(l.done.load(Ordering::Relaxed));
    done.set_message(format!(
        "failed {} retries {} {:.0} MiB",
        l.failed.load(Ordering::Relaxed),
        l.retries.load(Ordering::Relaxed),
        l.bytes.load(Ordering::Relaxed) as f64 / 1048576.0
    ));
}
