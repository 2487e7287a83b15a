//! `PowerBackend` over the ipmitool binary (`-I lanplus`, IPMI 2.0 / RMCP+).
//!
//! The password reaches ipmitool only through its environment (`-E` reads
//! `IPMI_PASSWORD`), never on the command line, where any local user could
//! read it in `/proc/<pid>/cmdline`. `-v` makes ipmitool say which step of
//! session setup failed, which tells a BMC that does not answer (transport:
//! retried) from one that refuses the credentials or cipher suite (not
//! retried).

use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::process::Command;

use super::backend::{Action, BmcTarget, BootDevice, PowerBackend, PowerError};
use super::IpmiMetrics;
use std::sync::Arc;

pub struct Ipmitool {
    pub binary: PathBuf,
    /// Kill a command that has not finished after this long.
    pub command_timeout: Duration,
    /// ipmitool's own per-packet timeout (`-N`, seconds).
    pub session_timeout_seconds: u32,
    pub metrics: Option<Arc<IpmiMetrics>>,
}

/// Lines of `ipmitool -v` stderr that mean no answer from the BMC.
const NO_ANSWER: [&str; 5] = [
    "Get Auth Capabilities error",
    "Error issuing Get Channel Authentication Capabilities",
    "No response from remote controller",
    "Insufficient resources for session",
    "Address lookup for",
];
const NO_SESSION: &str = "Unable to establish IPMI v2 / RMCP+ session";

impl Ipmitool {
    pub fn new(binary: PathBuf, command_timeout: Duration) -> Ipmitool {
        Ipmitool {
            binary,
            command_timeout,
            session_timeout_seconds: 1,
            metrics: None,
        }
    }

    /// The argument list: everything but the password.
    pub fn args(&self, t: &BmcTarget, command: &[&str]) -> Vec<String> {
        let mut a: Vec<String> = [
            "-v",
            "-I",
            "lanplus",
            "-H",
            &t.address.to_string(),
            "-p",
            &t.port.to_string(),
            "-U",
            &t.username,
            "-E",
            "-C",
            &t.cipher_suite.to_string(),
            "-N",
            &self.session_timeout_seconds.to_string(),
            "-R",
            "1",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        a.extend(command.iter().map(|s| s.to_string()));
        a
    }

    async fn run(&self, t: &BmcTarget, command: &[&str]) -> Result<String, PowerError> {
        let endpoint = t.endpoint();
        let started = Instant::now();
        let child = Command::new(&self.binary)
            .args(self.args(t, command))
            .env("IPMI_PASSWORD", &t.password)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| PowerError::Spawn(format!("{}: {e}", self.binary.display())))?;
        let out = tokio::time::timeout(self.command_timeout, child.wait_with_output()).await;
        if let Some(m) = &self.metrics {
            m.command_seconds.observe(started.elapsed().as_secs_f64());
        }
        let out = match out {
            Ok(Ok(o)) => o,
            Ok(Err(e)) => return Err(PowerError::Spawn(format!("{}: {e}", self.binary.display()))),
            Err(_) => {
                return Err(PowerError::Timeout {
                    endpoint,
                    timeout: self.command_timeout,
                })
            }
        };
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        if out.status.success() {
            return Ok(stdout);
        }
        Err(classify(t, &stderr))
    }

    async fn power_state(&self, t: &BmcTarget) -> Result<String, PowerError> {
        let out = self.run(t, &["chassis", "power", "status"]).await?;
        parse_power(&out).ok_or_else(|| PowerError::Command {
            endpoint: t.endpoint(),
            detail: format!("unexpected power status answer {:?}", out.trim()),
        })
    }
}

/// Turns a failed run's stderr into the error an operator can act on.
pub fn classify(t: &BmcTarget, stderr: &str) -> PowerError {
    let endpoint = t.endpoint();
    let detail = summary(stderr);
    if NO_ANSWER.iter().any(|m| stderr.contains(m)) {
        return PowerError::Unreachable { endpoint, detail };
    }
    if stderr.contains(NO_SESSION) {
        return PowerError::Auth {
            endpoint,
            user: t.username.clone(),
            suite: t.cipher_suite,
            detail,
        };
    }
    PowerError::Command { endpoint, detail }
}

/// The meaningful stderr lines, joined (verbose chatter dropped, bounded).
fn summary(stderr: &str) -> String {
    let lines: Vec<&str> = stderr
        .lines()
        .map(str::trim)
        .filter(|l| {
            !l.is_empty()
                && !l.starts_with("Loading IANA")
                && !l.starts_with("Running Get VSO")
                && !l.starts_with("Discovered IPMB")
                && !l.starts_with("Invalid completion code received: Invalid command")
        })
        .collect();
    let mut s = lines.join("; ");
    if s.len() > 512 {
        let mut cut = 512;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
    }
    if s.is_empty() {
        "ipmitool failed without a message".into()
    } else {
        s
    }
}

/// "Chassis Power is on" → "on".
pub fn parse_power(stdout: &str) -> Option<String> {
    stdout.lines().find_map(|l| {
        l.trim()
            .strip_prefix("Chassis Power is ")
            .map(|s| s.trim().to_string())
    })
}

/// The "Boot Device Selector" line of `chassis bootparam get 5`.
pub fn parse_bootdev(stdout: &str) -> Option<String> {
    stdout.lines().find_map(|l| {
        let l = l.trim().trim_start_matches("- ");
        l.strip_prefix("Boot Device Selector :")
            .map(|s| s.trim().to_string())
    })
}

impl PowerBackend for Ipmitool {
    fn name(&self) -> &'static str {
        "ipmitool"
    }

    async fn execute(&self, t: &BmcTarget, action: Action) -> Result<String, PowerError> {
        let power = |word: &'static str| ["chassis", "power", word];
        match action {
            Action::PowerStatus => Ok(format!("power {}", self.power_state(t).await?)),
            Action::PowerOn
            | Action::PowerOff
            | Action::PowerSoft
            | Action::PowerReset
            | Action::PowerCycle => {
                let word = match action {
                    Action::PowerOn => "on",
                    Action::PowerOff => "off",
                    Action::PowerSoft => "soft",
                    Action::PowerReset => "reset",
                    _ => "cycle",
                };
                // "cycle" and "reset" of a powered-off chassis are refused by
                // many BMCs; power it on instead (the caller wants it running).
                let mut word = word;
                if matches!(action, Action::PowerCycle | Action::PowerReset)
                    && self.power_state(t).await? == "off"
                {
                    word = "on";
                }
                self.run(t, &power(word)).await?;
                Ok(format!("power {}", self.power_state(t).await?))
            }
            Action::Bootdev {
                device,
                uefi,
                persistent,
            } => {
                let dev = match device {
                    BootDevice::Pxe => "pxe",
                    BootDevice::Disk => "disk",
                };
                let mut options = Vec::new();
                if uefi {
                    options.push("efiboot");
                }
                if persistent {
                    options.push("persistent");
                }
                let opt = format!("options={}", options.join(","));
                let mut cmd = vec!["chassis", "bootdev", dev];
                if !options.is_empty() {
                    cmd.push(&opt);
                }
                self.run(t, &cmd).await?;
                let read = self
                    .run(t, &["chassis", "bootparam", "get", "5"])
                    .await
                    .ok()
                    .and_then(|o| parse_bootdev(&o));
                Ok(match read {
                    Some(sel) => format!("boot device {dev} ({sel})"),
                    None => format!("boot device {dev}"),
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target() -> BmcTarget {
        BmcTarget {
            address: "127.0.0.1".parse().unwrap(),
            port: 6230,
            username: "admin".into(),
            password: "hunter2".into(),
            cipher_suite: 3,
        }
    }

    #[test]
    fn password_is_never_an_argument() {
        let t = target();
        let tool = Ipmitool::new("ipmitool".into(), Duration::from_secs(5));
        let args = tool.args(&t, &["chassis", "power", "on"]);
        assert!(args.iter().all(|a| !a.contains("hunter2")));
        assert!(args.contains(&"-E".to_string()));
        assert!(!format!("{t:?}").contains("hunter2"));
    }

    #[test]
    fn failures_are_classified_from_verbose_stderr() {
        let t = target();
        let auth = classify(
            &t,
            "Loading IANA PEN Registry...\n> RAKP 2 HMAC is invalid\nError: Unable to establish IPMI v2 / RMCP+ session\n",
        );
        assert!(matches!(auth, PowerError::Auth { .. }));
        assert!(!auth.retryable());
        assert!(auth.to_string().contains(NO_SESSION));
        assert!(auth.to_string().contains("RAKP 2 HMAC is invalid"));
        let gone = classify(
            &t,
            "Loading IANA PEN Registry...\nGet Auth Capabilities error\nError issuing Get Channel Authentication Capabilities request\nError: Unable to establish IPMI v2 / RMCP+ session\n",
        );
        assert!(matches!(gone, PowerError::Unreachable { .. }));
        assert!(gone.retryable());
        assert_eq!(parse_power("Chassis Power is on\n").as_deref(), Some("on"));
        assert_eq!(
            parse_bootdev("   - Boot Device Selector : Force PXE\n").as_deref(),
            Some("Force PXE")
        );
    }
}
