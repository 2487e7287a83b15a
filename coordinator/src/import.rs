//! Host import files (`pxemeshctl host import FILE`): CSV or JSON to [`Host`]s.
//!
//! JSON: an array of host objects, or `{"hosts": [...]}`; each object has `name`,
//! `mac`, `ip`, `hostname`, `rack`, `network`, `profile`, `labels` (an object of
//! strings) and `bmc` (`address`, `port`, `username`, `password`, `cipher_suite`).
//!
//! CSV: a header row naming any subset of the columns `name, mac, ip, hostname,
//! rack, network, profile, labels, bmc_address, bmc_port, bmc_username,
//! bmc_password, bmc_cipher_suite`, in any order; `labels` is `k=v;k2=v2`. Lines
//! starting with `#` are comments.
//!
//! Parsing is local and pure: it checks what can be checked without the cluster
//! (syntax, numbers, IP and MAC format, duplicates within the file) and names the
//! line (CSV, JSON syntax) or record (JSON) and the field of the first problem.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::IpAddr;

use pxemesh_proto::v1::{Bmc, Host};
use serde::Deserialize;

/// Where in the file a problem is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Location {
    /// A line of the file (1-based).
    Line(u64),
    /// A record of a JSON file (1-based).
    Record(usize),
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Location::Line(n) => write!(f, "line {n}"),
            Location::Record(n) => write!(f, "record {n}"),
        }
    }
}

/// Why an import file was rejected.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ImportError {
    /// A field's value is invalid.
    #[error("{location}: {field}: {message}")]
    Field {
        /// Where.
        location: Location,
        /// The field (CSV column or JSON key; nested JSON keys as `bmc.port`).
        field: String,
        /// What is wrong.
        message: String,
    },
    /// The file is not well-formed CSV/JSON, or has the wrong structure.
    #[error("{location}: {message}")]
    Syntax {
        /// Where.
        location: Location,
        /// What is wrong.
        message: String,
    },
    /// The file holds no hosts.
    #[error("no hosts in file")]
    Empty,
}

/// File formats understood by [`parse_hosts`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// Comma-separated values with a header row.
    Csv,
    /// A JSON array of hosts or `{"hosts": [...]}`.
    Json,
}

/// The format of `path_or_name`/`content`: by extension (`.csv`, `.json`), else
/// JSON if the content starts with `[` or `{`, else CSV.
pub fn detect_format(path_or_name: &str, content: &str) -> Format {
    let lower = path_or_name.to_ascii_lowercase();
    if lower.ends_with(".csv") {
        Format::Csv
    } else if lower.ends_with(".json") {
        Format::Json
    } else {
        match strip_bom(content).trim_start().chars().next() {
            Some('[') | Some('{') => Format::Json,
            _ => Format::Csv,
        }
    }
}

/// Parses a host import file; the format comes from [`detect_format`].
pub fn parse_hosts(path_or_name: &str, content: &str) -> Result<Vec<Host>, ImportError> {
    let content = strip_bom(content);
    let hosts = match detect_format(path_or_name, content) {
        Format::Csv => parse_csv(content)?,
        Format::Json => parse_json(content)?,
    };
    if hosts.is_empty() {
        return Err(ImportError::Empty);
    }
    check_duplicates(&hosts)?;
    Ok(hosts.into_iter().map(|(_, h)| h).collect())
}

fn strip_bom(s: &str) -> &str {
    s.strip_prefix('\u{feff}').unwrap_or(s)
}

fn field_err(location: Location, field: &str, message: impl Into<String>) -> ImportError {
    ImportError::Field {
        location,
        field: field.to_string(),
        message: message.into(),
    }
}

// ---------------------------------------------------------------------------
// JSON
// ---------------------------------------------------------------------------

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct HostsFileJson {
    hosts: Vec<HostJson>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct HostJson {
    name: String,
    #[serde(default)]
    mac: String,
    #[serde(default)]
    ip: String,
    #[serde(default)]
    hostname: String,
    #[serde(default)]
    rack: String,
    #[serde(default)]
    network: String,
    #[serde(default)]
    profile: String,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    #[serde(default)]
    bmc: Option<BmcJson>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BmcJson {
    #[serde(default)]
    address: String,
    #[serde(default)]
    port: u16,
    #[serde(default)]
    username: String,
    #[serde(default)]
    password: String,
    #[serde(default)]
    cipher_suite: u32,
}

fn json_syntax(e: serde_json::Error) -> ImportError {
    // serde_json's message ends with " at line L column C"; keep the message and
    // report the line in front, like every other error.
    let full = e.to_string();
    let message = match full.rsplit_once(" at line ") {
        Some((msg, _)) => format!("{msg} (column {})", e.column()),
        None => full,
    };
    ImportError::Syntax {
        location: Location::Line(e.line() as u64),
        message,
    }
}

fn parse_json(content: &str) -> Result<Vec<(Location, Host)>, ImportError> {
    let records: Vec<HostJson> = match content.trim_start().chars().next() {
        Some('{') => {
            serde_json::from_str::<HostsFileJson>(content)
                .map_err(json_syntax)?
                .hosts
        }
        Some('[') => serde_json::from_str(content).map_err(json_syntax)?,
        _ => {
            return Err(ImportError::Syntax {
                location: Location::Line(1),
                message: "expected a JSON array of hosts or an object {\"hosts\": [...]}".into(),
            })
        }
    };
    records
        .into_iter()
        .enumerate()
        .map(|(i, r)| {
            let loc = Location::Record(i + 1);
            let labels = r.labels.into_iter().collect::<HashMap<_, _>>();
            let host = Host {
                name: r.name,
                mac: r.mac,
                ip: r.ip,
                hostname: r.hostname,
                rack: r.rack,
                network: r.network,
                profile: r.profile,
                labels,
                bmc: r.bmc.map(|b| Bmc {
                    address: b.address,
                    port: u32::from(b.port),
                    username: b.username,
                    password: b.password,
                    password_set: false,
                    cipher_suite: b.cipher_suite,
                }),
                create_revision: 0,
                revision: 0,
            };
            check_host(loc, &host, "bmc.")?;
            Ok((loc, host))
        })
        .collect()
}

// ---------------------------------------------------------------------------
// CSV
// ---------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Column {
    Name,
    Mac,
    Ip,
    Hostname,
    Rack,
    Network,
    Profile,
    Labels,
    BmcAddress,
    BmcPort,
    BmcUsername,
    BmcPassword,
    BmcCipherSuite,
}

const COLUMNS: &[(&str, Column)] = &[
    ("name", Column::Name),
    ("mac", Column::Mac),
    ("ip", Column::Ip),
    ("hostname", Column::Hostname),
    ("rack", Column::Rack),
    ("network", Column::Network),
    ("profile", Column::Profile),
    ("labels", Column::Labels),
    ("bmc_address", Column::BmcAddress),
    ("bmc_port", Column::BmcPort),
    ("bmc_username", Column::BmcUsername),
    ("bmc_password", Column::BmcPassword),
    ("bmc_cipher_suite", Column::BmcCipherSuite),
];

fn csv_error(e: csv::Error) -> ImportError {
    let line = e.position().map(|p| p.line()).unwrap_or(1);
    let message = match e.kind() {
        csv::ErrorKind::UnequalLengths {
            expected_len, len, ..
        } => format!("expected {expected_len} fields (as in the header), found {len}"),
        csv::ErrorKind::Utf8 { err, .. } => format!("invalid UTF-8: {err}"),
        _ => e.to_string(),
    };
    ImportError::Syntax {
        location: Location::Line(line),
        message,
    }
}

fn parse_csv(content: &str) -> Result<Vec<(Location, Host)>, ImportError> {
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(true)
        .trim(csv::Trim::All)
        .comment(Some(b'#'))
        .from_reader(content.as_bytes());
    let header_line = reader
        .headers()
        .map_err(csv_error)?
        .position()
        .map(|p| p.line())
        .unwrap_or(1);
    let headers = reader.headers().map_err(csv_error)?.clone();
    let header_loc = Location::Line(header_line);
    let mut columns = Vec::with_capacity(headers.len());
    for (i, h) in headers.iter().enumerate() {
        let key = h.to_ascii_lowercase();
        let Some(&(_, col)) = COLUMNS.iter().find(|(n, _)| *n == key) else {
            let known: Vec<&str> = COLUMNS.iter().map(|(n, _)| *n).collect();
            return Err(ImportError::Syntax {
                location: header_loc,
                message: format!(
                    "unknown column {h:?} (column {}); known columns: {}",
                    i + 1,
                    known.join(", ")
                ),
            });
        };
        if columns.contains(&col) {
            return Err(ImportError::Syntax {
                location: header_loc,
                message: format!("column {key:?} appears twice"),
            });
        }
        columns.push(col);
    }
    if !columns.contains(&Column::Name) {
        return Err(ImportError::Syntax {
            location: header_loc,
            message: "the header has no \"name\" column".into(),
        });
    }

    let mut hosts = Vec::new();
    for record in reader.records() {
        let record = record.map_err(csv_error)?;
        let loc = Location::Line(record.position().map(|p| p.line()).unwrap_or(0));
        let mut host = Host::default();
        let mut bmc = Bmc::default();
        let mut has_bmc = false;
        for (col, value) in columns.iter().zip(record.iter()) {
            let value = value.to_string();
            match col {
                Column::Name => host.name = value,
                Column::Mac => host.mac = value,
                Column::Ip => host.ip = value,
                Column::Hostname => host.hostname = value,
                Column::Rack => host.rack = value,
                Column::Network => host.network = value,
                Column::Profile => host.profile = value,
                Column::Labels => host.labels = parse_labels(&value, loc)?,
                Column::BmcAddress => {
                    has_bmc |= !value.is_empty();
                    bmc.address = value;
                }
                Column::BmcPort => {
                    has_bmc |= !value.is_empty();
                    bmc.port = parse_number::<u16>(&value, loc, "bmc_port")?.into();
                }
                Column::BmcUsername => {
                    has_bmc |= !value.is_empty();
                    bmc.username = value;
                }
                Column::BmcPassword => {
                    has_bmc |= !value.is_empty();
                    bmc.password = value;
                }
                Column::BmcCipherSuite => {
                    has_bmc |= !value.is_empty();
                    bmc.cipher_suite = parse_number::<u32>(&value, loc, "bmc_cipher_suite")?;
                }
            }
        }
        if has_bmc {
            host.bmc = Some(bmc);
        }
        check_host(loc, &host, "bmc_")?;
        hosts.push((loc, host));
    }
    Ok(hosts)
}

fn parse_number<T>(value: &str, loc: Location, field: &str) -> Result<T, ImportError>
where
    T: std::str::FromStr + Default,
    T::Err: fmt::Display,
{
    if value.is_empty() {
        return Ok(T::default());
    }
    value
        .parse::<T>()
        .map_err(|e| field_err(loc, field, format!("{e} ({value:?})")))
}

/// Parses `k=v;k2=v2` (empty entries are ignored).
pub fn parse_labels(value: &str, loc: Location) -> Result<HashMap<String, String>, ImportError> {
    let mut labels = HashMap::new();
    for entry in value.split(';').map(str::trim).filter(|e| !e.is_empty()) {
        let Some((k, v)) = entry.split_once('=') else {
            return Err(field_err(
                loc,
                "labels",
                format!("expected key=value, got {entry:?}"),
            ));
        };
        let (k, v) = (k.trim(), v.trim());
        if k.is_empty() {
            return Err(field_err(
                loc,
                "labels",
                format!("empty label key in {entry:?}"),
            ));
        }
        if labels.insert(k.to_string(), v.to_string()).is_some() {
            return Err(field_err(loc, "labels", format!("label {k:?} given twice")));
        }
    }
    Ok(labels)
}

// ---------------------------------------------------------------------------
// Checks shared by both formats
// ---------------------------------------------------------------------------

/// Whether `mac` is six hex octets separated by `:` or `-`.
fn valid_mac(mac: &str) -> bool {
    let parts: Vec<&str> = mac.split([':', '-']).collect();
    parts.len() == 6
        && parts
            .iter()
            .all(|p| p.len() == 2 && p.chars().all(|c| c.is_ascii_hexdigit()))
}

/// Local checks of one host; `bmc_prefix` is how BMC fields are named in the
/// file format (`bmc_` for CSV columns, `bmc.` for JSON keys).
fn check_host(loc: Location, host: &Host, bmc_prefix: &str) -> Result<(), ImportError> {
    if host.name.trim().is_empty() {
        return Err(field_err(loc, "name", "missing"));
    }
    if !host.mac.is_empty() && !valid_mac(&host.mac) {
        return Err(field_err(
            loc,
            "mac",
            format!("{:?} is not a MAC address like aa:bb:cc:dd:ee:ff", host.mac),
        ));
    }
    if !host.ip.is_empty() {
        if let Err(e) = host.ip.parse::<IpAddr>() {
            return Err(field_err(loc, "ip", format!("{e} ({:?})", host.ip)));
        }
    }
    if let Some(bmc) = &host.bmc {
        if bmc.port > u32::from(u16::MAX) {
            return Err(field_err(
                loc,
                &format!("{bmc_prefix}port"),
                format!("{} is not a port number", bmc.port),
            ));
        }
        if !matches!(bmc.cipher_suite, 0 | 3 | 17) {
            return Err(field_err(
                loc,
                &format!("{bmc_prefix}cipher_suite"),
                format!("{} is not allowed (3 or 17)", bmc.cipher_suite),
            ));
        }
    }
    Ok(())
}

/// Host names and MACs must be unique within one file.
fn check_duplicates(hosts: &[(Location, Host)]) -> Result<(), ImportError> {
    let mut names: HashMap<&str, Location> = HashMap::new();
    let mut macs: HashMap<String, Location> = HashMap::new();
    for (loc, host) in hosts {
        if let Some(first) = names.insert(host.name.as_str(), *loc) {
            return Err(field_err(
                *loc,
                "name",
                format!("duplicate host {:?} (first at {first})", host.name),
            ));
        }
        if !host.mac.is_empty() {
            let key = host.mac.to_ascii_lowercase().replace('-', ":");
            if let Some(first) = macs.insert(key, *loc) {
                return Err(field_err(
                    *loc,
                    "mac",
                    format!("duplicate MAC {} (first at {first})", host.mac),
                ));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field(e: &ImportError) -> (&Location, &str) {
        match e {
            ImportError::Field {
                location, field, ..
            } => (location, field.as_str()),
            other => panic!("expected a field error, got {other:?}"),
        }
    }

    const CSV: &str = "\
# rack 1 hosts
name,mac,ip,rack,network,labels,bmc_address,bmc_port,bmc_username,bmc_password,bmc_cipher_suite
h1,aa:bb:cc:dd:ee:01,10.20.0.11,r1,n1,role=compute;zone = a,10.99.0.11,623,admin,s3cret,3
 h2 , AA-BB-CC-DD-EE-02 ,10.20.0.12,r1,n1,,,,,,
";

    #[test]
    fn csv_hosts() {
        let hosts = parse_hosts("hosts.csv", CSV).unwrap();
        assert_eq!(hosts.len(), 2);
        let h1 = &hosts[0];
        assert_eq!(h1.name, "h1");
        assert_eq!(h1.mac, "aa:bb:cc:dd:ee:01");
        assert_eq!(h1.ip, "10.20.0.11");
        assert_eq!((h1.rack.as_str(), h1.network.as_str()), ("r1", "n1"));
        assert_eq!(h1.labels.get("role").map(String::as_str), Some("compute"));
        assert_eq!(h1.labels.get("zone").map(String::as_str), Some("a"));
        let bmc = h1.bmc.as_ref().unwrap();
        assert_eq!(bmc.address, "10.99.0.11");
        assert_eq!(bmc.port, 623);
        assert_eq!(bmc.username, "admin");
        assert_eq!(bmc.password, "s3cret");
        assert_eq!(bmc.cipher_suite, 3);
        let h2 = &hosts[1];
        assert_eq!(h2.name, "h2");
        assert_eq!(h2.mac, "AA-BB-CC-DD-EE-02");
        assert!(h2.labels.is_empty());
        assert!(h2.bmc.is_none());
    }

    #[test]
    fn csv_subset_any_order_and_sniffing() {
        let content = "ip,name\n10.0.0.1,a\n10.0.0.2,b\n";
        let hosts = parse_hosts("-", content).unwrap();
        assert_eq!(hosts.len(), 2);
        assert_eq!(
            (hosts[1].name.as_str(), hosts[1].ip.as_str()),
            ("b", "10.0.0.2")
        );
        assert!(hosts[1].mac.is_empty());
        assert_eq!(detect_format("x.CSV", "[1]"), Format::Csv);
        assert_eq!(detect_format("stdin", "\u{feff}  [ ]"), Format::Json);
        assert_eq!(detect_format("hosts.txt", "{"), Format::Json);
        assert_eq!(detect_format("hosts.txt", "name\n"), Format::Csv);
    }

    #[test]
    fn csv_bad_port_names_line_and_field() {
        let content = "name,bmc_port\na,623\nb,\nc,62x\n";
        let e = parse_hosts("h.csv", content).unwrap_err();
        assert_eq!(field(&e), (&Location::Line(4), "bmc_port"));
        let msg = e.to_string();
        assert!(msg.starts_with("line 4: bmc_port: invalid digit"), "{msg}");
        let e = parse_hosts("h.csv", "name,bmc_port\na,70000\n").unwrap_err();
        assert_eq!(field(&e), (&Location::Line(2), "bmc_port"));
    }

    #[test]
    fn csv_errors() {
        let e = parse_hosts("h.csv", "name,colour\na,red\n").unwrap_err();
        assert!(
            e.to_string()
                .starts_with("line 1: unknown column \"colour\""),
            "{e}"
        );

        let e = parse_hosts("h.csv", "mac\naa:bb:cc:dd:ee:ff\n").unwrap_err();
        assert!(e.to_string().contains("no \"name\" column"), "{e}");

        let e = parse_hosts("h.csv", "name,ip\na,10.0.0.1\nb\n").unwrap_err();
        assert!(
            e.to_string().starts_with("line 3: expected 2 fields"),
            "{e}"
        );

        let e = parse_hosts("h.csv", "name,labels\na,x=1\nb,x=1;oops\n").unwrap_err();
        assert_eq!(field(&e), (&Location::Line(3), "labels"));

        let e = parse_hosts("h.csv", "name,ip\na,10.0.0.1\nb,10.0.0.300\n").unwrap_err();
        assert_eq!(field(&e), (&Location::Line(3), "ip"));

        let e = parse_hosts("h.csv", "name,mac\na,aa:bb:cc:dd:ee\n").unwrap_err();
        assert_eq!(field(&e), (&Location::Line(2), "mac"));

        let e = parse_hosts("h.csv", "name,ip\na,10.0.0.1\n,10.0.0.2\n").unwrap_err();
        assert_eq!(field(&e), (&Location::Line(3), "name"));

        let e = parse_hosts("h.csv", "name,bmc_cipher_suite\na,5\n").unwrap_err();
        assert_eq!(field(&e), (&Location::Line(2), "bmc_cipher_suite"));

        let e = parse_hosts(
            "h.csv",
            "name,mac\na,aa:bb:cc:dd:ee:01\nb,AA:BB:CC:DD:EE:01\n",
        )
        .unwrap_err();
        assert_eq!(field(&e), (&Location::Line(3), "mac"));
        assert!(e.to_string().contains("first at line 2"), "{e}");

        let e = parse_hosts("h.csv", "name\na\nb\na\n").unwrap_err();
        assert_eq!(field(&e), (&Location::Line(4), "name"));

        assert_eq!(parse_hosts("h.csv", "name,ip\n"), Err(ImportError::Empty));
    }

    const JSON: &str = r#"[
  {"name": "h1", "mac": "aa:bb:cc:dd:ee:01", "ip": "10.20.0.11", "hostname": "h1.example",
   "rack": "r1", "network": "n1", "profile": "centos",
   "labels": {"role": "compute"},
   "bmc": {"address": "10.99.0.11", "port": 623, "username": "admin", "password": "pw", "cipher_suite": 17}},
  {"name": "h2", "ip": "10.20.0.12"}
]"#;

    #[test]
    fn json_hosts() {
        let hosts = parse_hosts("hosts.json", JSON).unwrap();
        assert_eq!(hosts.len(), 2);
        let h1 = &hosts[0];
        assert_eq!(h1.hostname, "h1.example");
        assert_eq!(h1.profile, "centos");
        assert_eq!(h1.labels.get("role").map(String::as_str), Some("compute"));
        let bmc = h1.bmc.as_ref().unwrap();
        assert_eq!(
            (
                bmc.address.as_str(),
                bmc.port,
                bmc.username.as_str(),
                bmc.password.as_str()
            ),
            ("10.99.0.11", 623, "admin", "pw")
        );
        assert_eq!(bmc.cipher_suite, 17);
        assert!(hosts[1].bmc.is_none());

        let wrapped = format!("{{\"hosts\": {JSON}}}");
        assert_eq!(parse_hosts("hosts", &wrapped).unwrap(), hosts);
    }

    #[test]
    fn json_errors() {
        let e = parse_hosts(
            "h.json",
            "[\n {\"name\": \"a\"},\n {\"name\": \"b\", \"macc\": \"x\"}\n]",
        )
        .unwrap_err();
        assert!(
            e.to_string().starts_with("line 3: unknown field `macc`"),
            "{e}"
        );

        let e = parse_hosts(
            "h.json",
            "[\n {\"name\": \"a\",\n  \"bmc\": {\"port\": \"623\"}}\n]",
        )
        .unwrap_err();
        assert!(e.to_string().starts_with("line 3: invalid type"), "{e}");

        let e =
            parse_hosts("h.json", "[{\"name\": \"a\", \"bmc\": {\"port\": 70000}}]").unwrap_err();
        assert!(e.to_string().starts_with("line 1: invalid value"), "{e}");

        let e = parse_hosts(
            "h.json",
            "[{\"name\": \"a\"}, {\"mac\": \"aa:bb:cc:dd:ee:ff\"}]",
        )
        .unwrap_err();
        assert!(e.to_string().contains("missing field `name`"), "{e}");

        let e = parse_hosts(
            "h.json",
            "[{\"name\": \"a\"}, {\"name\": \"b\", \"ip\": \"x\"}]",
        )
        .unwrap_err();
        assert_eq!(field(&e), (&Location::Record(2), "ip"));
        assert!(e.to_string().starts_with("record 2: ip: "), "{e}");

        let e = parse_hosts(
            "h.json",
            "[{\"name\": \"a\", \"bmc\": {\"cipher_suite\": 1}}]",
        )
        .unwrap_err();
        assert_eq!(field(&e), (&Location::Record(1), "bmc.cipher_suite"));

        let e = parse_hosts("h.json", "[{\"name\": \"a\"}, {\"name\": \"a\"}]").unwrap_err();
        assert_eq!(field(&e), (&Location::Record(2), "name"));
        assert!(e.to_string().contains("first at record 1"), "{e}");

        let e = parse_hosts("h.json", "[{\"name\": \"a\",]").unwrap_err();
        assert!(matches!(e, ImportError::Syntax { .. }), "{e}");

        let e = parse_hosts("h.json", "{\"hosts\": [], \"extra\": 1}").unwrap_err();
        assert!(e.to_string().contains("unknown field `extra`"), "{e}");

        assert_eq!(parse_hosts("h.json", "[]"), Err(ImportError::Empty));
        assert_eq!(
            parse_hosts("h.json", "{\"hosts\": []}"),
            Err(ImportError::Empty)
        );
        assert!(matches!(
            parse_hosts("h.json", "\"x\""),
            Err(ImportError::Syntax { .. })
        ));
    }
}
