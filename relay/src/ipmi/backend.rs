//! The seam between job execution and the protocol that reaches a BMC.
//! `Ipmitool` (IPMI 2.0 / RMCP+ through the ipmitool binary) is the one
//! shipped; a Redfish backend implements the same trait.

use std::collections::HashMap;
use std::future::Future;
use std::net::IpAddr;
use std::time::Duration;

/// What a job asks of a BMC.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    PowerOn,
    PowerOff,
    PowerSoft,
    PowerCycle,
    PowerReset,
    PowerStatus,
    Bootdev {
        device: BootDevice,
        uefi: bool,
        persistent: bool,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BootDevice {
    Pxe,
    Disk,
}

impl Action {
    /// From a job's action word and arguments (as the coordinators store them).
    pub fn parse(action: &str, args: &HashMap<String, String>) -> Result<Action, String> {
        let flag = |k: &str| args.get(k).is_some_and(|v| v == "true");
        Ok(match action {
            "power-on" => Action::PowerOn,
            "power-off" => Action::PowerOff,
            "power-soft" => Action::PowerSoft,
            "power-cycle" => Action::PowerCycle,
            "power-reset" => Action::PowerReset,
            "power-status" => Action::PowerStatus,
            "bootdev-pxe" | "bootdev-disk" => Action::Bootdev {
                device: if action == "bootdev-pxe" {
                    BootDevice::Pxe
                } else {
                    BootDevice::Disk
                },
                uefi: flag("uefi"),
                persistent: flag("persistent"),
            },
            other => return Err(format!("unknown job action {other:?}")),
        })
    }

    /// The words operators search for: "Unable to <verb> host via IPMI".
    pub fn verb(&self) -> &'static str {
        match self {
            Action::PowerOn => "power on",
            Action::PowerOff => "power off",
            Action::PowerSoft => "soft power off",
            Action::PowerCycle => "power cycle",
            Action::PowerReset => "reset",
            Action::PowerStatus => "read the power state of",
            Action::Bootdev { .. } => "set the boot device of",
        }
    }
}

/// A BMC as the relay reaches it. The password never appears in `Debug`.
#[derive(Clone)]
pub struct BmcTarget {
    pub address: IpAddr,
    pub port: u16,
    pub username: String,
    pub password: String,
    pub cipher_suite: u8,
}

impl std::fmt::Debug for BmcTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BmcTarget")
            .field("address", &self.address)
            .field("port", &self.port)
            .field("username", &self.username)
            .field("password", &"<redacted>")
            .field("cipher_suite", &self.cipher_suite)
            .finish()
    }
}

impl BmcTarget {
    pub fn endpoint(&self) -> String {
        match self.address {
            IpAddr::V6(a) => format!("[{a}]:{}", self.port),
            IpAddr::V4(a) => format!("{a}:{}", self.port),
        }
    }
}

/// Why one attempt failed. Transport failures are retried with back-off;
/// authentication and command failures are not (repeating cannot help).
#[derive(Debug, Clone, thiserror::Error)]
pub enum PowerError {
    #[error("Unable to establish IPMI v2 / RMCP+ session with BMC {endpoint} as user {user:?} using cipher suite {suite} (wrong credentials or cipher suite not enabled on the BMC): {detail}")]
    Auth {
        endpoint: String,
        user: String,
        suite: u8,
        detail: String,
    },
    #[error("BMC {endpoint} did not answer: {detail}")]
    Unreachable { endpoint: String, detail: String },
    #[error("BMC {endpoint}: no answer from the IPMI command within {timeout:?}")]
    Timeout { endpoint: String, timeout: Duration },
    #[error("BMC {endpoint} refused the command: {detail}")]
    Command { endpoint: String, detail: String },
    #[error("cannot run the IPMI client: {0}")]
    Spawn(String),
}

impl PowerError {
    pub fn retryable(&self) -> bool {
        matches!(
            self,
            PowerError::Unreachable { .. } | PowerError::Timeout { .. }
        )
    }

    /// Metric label.
    pub fn kind(&self) -> &'static str {
        match self {
            PowerError::Auth { .. } => "auth",
            PowerError::Unreachable { .. } => "unreachable",
            PowerError::Timeout { .. } => "timeout",
            PowerError::Command { .. } => "command",
            PowerError::Spawn(_) => "spawn",
        }
    }
}

/// Executes one action against one BMC and reads the outcome back (the power
/// state after a power action, the boot device after bootdev). Must be safe
/// to repeat: a job may run again after its relay died.
pub trait PowerBackend: Send + Sync + 'static {
    fn name(&self) -> &'static str;
    fn execute(
        &self,
        target: &BmcTarget,
        action: Action,
    ) -> impl Future<Output = Result<String, PowerError>> + Send;
}
