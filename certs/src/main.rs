//! `pxemesh-certs`: create the installation CA, issue leaf certificates, inspect them.

use std::net::IpAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};
use time::format_description::well_known::Rfc3339;
use time::{Duration, OffsetDateTime};

use pxemesh_certs::inspect::CertInfo;
use pxemesh_certs::issue::default_stem;
use pxemesh_certs::{Ca, Identity, LeafRequest, Role};

#[derive(Parser)]
#[command(
    name = "pxemesh-certs",
    version,
    about = "pxemesh CA and SPIFFE identity certificates"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Create the installation CA (DIR/ca.pem, DIR/ca-key.pem). Never overwrites a CA key.
    Init {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        trust_domain: String,
        /// Validity of the CA certificate in days.
        #[arg(long, default_value_t = 3650)]
        days: u32,
    },
    /// Issue a leaf certificate signed by the CA.
    #[command(subcommand)]
    Issue(IssueCmd),
    /// Show a certificate's subject, identity, SANs, validity and fingerprint.
    Inspect {
        file: PathBuf,
        #[arg(short = 'o', long = "output", value_enum, default_value_t = Output::Text)]
        output: Output,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum Output {
    Text,
    Json,
}

#[derive(Subcommand)]
enum IssueCmd {
    /// A coordinator node (defaults to SANs DNS localhost + IP 127.0.0.1 if none given).
    Coordinator {
        /// Raft node id (> 0).
        #[arg(long)]
        id: u64,
        #[command(flatten)]
        sans: SanArgs,
        #[command(flatten)]
        common: CommonArgs,
    },
    /// A rack relay.
    Relay {
        #[arg(long)]
        rack: String,
        #[arg(long)]
        name: String,
        #[command(flatten)]
        sans: SanArgs,
        #[command(flatten)]
        common: CommonArgs,
    },
    /// An administrator (read-only with --viewer).
    Admin {
        #[arg(long)]
        name: String,
        /// Read-only admin: spiffe://<td>/admin/viewer/<name>.
        #[arg(long)]
        viewer: bool,
        #[command(flatten)]
        common: CommonArgs,
    },
}

#[derive(Args)]
struct SanArgs {
    /// DNS name SAN (repeatable).
    #[arg(long = "dns", value_name = "NAME")]
    dns: Vec<String>,
    /// IP address SAN (repeatable).
    #[arg(long = "ip", value_name = "ADDR")]
    ip: Vec<IpAddr>,
}

#[derive(Args)]
struct CommonArgs {
    /// Directory holding ca.pem and ca-key.pem.
    #[arg(long, default_value = ".")]
    dir: PathBuf,
    /// Where to write the certificate and key (default: --dir).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Validity in days.
    #[arg(long, default_value_t = 365)]
    days: u32,
    /// Start of validity (RFC 3339); overrides the default of 5 minutes ago.
    #[arg(long, value_parser = parse_rfc3339)]
    not_before: Option<OffsetDateTime>,
    /// End of validity (RFC 3339); overrides --days.
    #[arg(long, value_parser = parse_rfc3339)]
    not_after: Option<OffsetDateTime>,
    /// File stem (default: coordinator-<id>, relay-<rack>-<name>, admin-<name>, viewer-<name>).
    #[arg(long)]
    stem: Option<String>,
}

fn parse_rfc3339(s: &str) -> Result<OffsetDateTime, String> {
    OffsetDateTime::parse(s, &Rfc3339)
        .map_err(|e| format!("{s:?} is not an RFC 3339 timestamp (e.g. 2030-01-02T03:04:05Z): {e}"))
}

fn main() -> ExitCode {
    // Printed by hand so that users get one line ("error: context: cause") instead of
    // anyhow's Debug output, which adds a backtrace whenever RUST_BACKTRACE is set.
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.cmd {
        Cmd::Init {
            dir,
            trust_domain,
            days,
        } => init(dir, &trust_domain, days),
        Cmd::Issue(cmd) => issue(cmd),
        Cmd::Inspect { file, output } => inspect(file, output),
    }
}

fn init(dir: PathBuf, trust_domain: &str, days: u32) -> Result<()> {
    let key = dir.join("ca-key.pem");
    // Checked before generating so the message is about the existing CA, not a
    // wasted key; Ca::save re-checks atomically.
    if key.exists() {
        bail!(
            "a CA already exists in {} ({} present); refusing to overwrite it",
            dir.display(),
            key.display()
        );
    }
    let ca = Ca::generate(trust_domain, days).context("generating the CA")?;
    ca.save(&dir).context("saving the CA")?;
    println!("trust domain: {}", ca.trust_domain());
    println!("not after:    {}", fmt_time(ca.not_after()));
    println!("wrote {}", dir.join("ca.pem").display());
    println!("wrote {}", key.display());
    Ok(())
}

fn issue(cmd: IssueCmd) -> Result<()> {
    let (role, sans, common) = match cmd {
        IssueCmd::Coordinator {
            id,
            mut sans,
            common,
        } => {
            // A coordinator is a TLS server; a local test cluster needs these to work.
            if sans.dns.is_empty() && sans.ip.is_empty() {
                sans.dns.push("localhost".into());
                sans.ip.push(IpAddr::from([127, 0, 0, 1]));
            }
            (Role::Coordinator { id }, sans, common)
        }
        IssueCmd::Relay {
            rack,
            name,
            sans,
            common,
        } => (Role::Relay { rack, name }, sans, common),
        IssueCmd::Admin {
            name,
            viewer,
            common,
        } => {
            let role = if viewer {
                Role::Viewer { name }
            } else {
                Role::Admin { name }
            };
            let sans = SanArgs {
                dns: Vec::new(),
                ip: Vec::new(),
            };
            (role, sans, common)
        }
    };

    let ca = Ca::load(&common.dir)
        .with_context(|| format!("loading the CA from {}", common.dir.display()))?;
    let identity = Identity::new(ca.trust_domain(), role);
    let mut req = LeafRequest::new(identity.clone(), common.days);
    req.dns_names = sans.dns;
    req.ips = sans.ip;
    if let Some(nb) = common.not_before {
        req.not_before = nb;
        if common.not_after.is_none() {
            req.not_after = nb + Duration::days(i64::from(common.days));
        }
    }
    if let Some(na) = common.not_after {
        req.not_after = na;
    }
    if req.not_after > ca.not_after() {
        eprintln!(
            "warning: the certificate's not-after ({}) is later than the CA's ({}); it stops verifying when the CA expires",
            fmt_time(req.not_after),
            fmt_time(ca.not_after())
        );
    }
    let leaf = ca.issue(&req)?;
    let out = common.out.unwrap_or(common.dir);
    let stem = common.stem.unwrap_or_else(|| default_stem(&identity));
    let (cert, key) = leaf
        .save(&out, &stem)
        .with_context(|| format!("saving the certificate for {identity}"))?;
    println!("identity:  {identity}");
    println!("not after: {}", fmt_time(req.not_after));
    println!("wrote {}", cert.display());
    println!("wrote {}", key.display());
    Ok(())
}

fn inspect(file: PathBuf, output: Output) -> Result<()> {
    let (info, count) = CertInfo::from_file(&file)?;
    match output {
        Output::Text => {
            if count > 1 {
                println!(
                    "{} holds {count} certificates; showing the first",
                    file.display()
                );
            }
            print!("{}", info.to_text());
        }
        Output::Json => {
            let mut v = info.to_json();
            v["file"] = file.display().to_string().into();
            v["certificates_in_file"] = count.into();
            println!("{}", serde_json::to_string_pretty(&v)?);
        }
    }
    Ok(())
}

/// Whole seconds: certificates store no more, so printing nanoseconds would mislead.
fn fmt_time(t: OffsetDateTime) -> String {
    let t = t.replace_nanosecond(0).unwrap_or(t);
    t.format(&Rfc3339).unwrap_or_else(|_| t.to_string())
}
