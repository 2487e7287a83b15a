//! A CloudStack management server API for tests: a real HTTP server on
//! 127.0.0.1:0 that verifies every request the way CloudStack's ApiServer
//! does (its own implementation, not the client's signing code: Java
//! `URLEncoder` rules, parameter names sorted as sent, whole string
//! lower-cased, HMAC-SHA1, `signatureVersion=3` + `expires` in the future)
//! and answers with CloudStack's JSON shapes: list commands paged with
//! `page`/`pagesize`, async jobs that go 0 → 1 (or 2) on
//! `queryAsyncJobResult`, `notifyBaremetalProvisionDone` recorded, and
//! injectable failures. `shutdown` makes it go away.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use axum::extract::{RawQuery, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use base64::Engine;
use hmac::{Hmac, Mac};
use serde_json::{json, Value};
use sha1::Sha1;
use tokio_util::sync::CancellationToken;

pub const API_KEY: &str = "sim-api-key_0123456789-ABCDEF";
pub const SECRET: &str = "sim-secret-KEY_9876543210-zyx";

/// A failure to inject into the next `count` calls.
#[derive(Clone, Debug)]
pub struct Failure {
    pub count: usize,
    pub http_status: u16,
    /// `Some((errorcode, errortext))` → CloudStack error JSON; `None` → an
    /// HTML body (a proxy's error page).
    pub error: Option<(u32, String)>,
    /// Only calls of this command fail (others pass untouched).
    pub command: Option<&'static str>,
}

#[derive(Clone, Debug)]
pub struct Job {
    pub command: String,
    pub pending_polls: u32,
    pub polls: u32,
    /// Ok(jobresult) → jobstatus 1; Err((code, text)) → jobstatus 2.
    pub outcome: Result<Value, (u32, String)>,
}

#[derive(Default)]
pub struct SimState {
    pub collections: BTreeMap<String, Vec<Value>>,
    pub jobs: BTreeMap<String, Job>,
    pub next_job: u64,
    /// How many polls new jobs stay pending, and whether they fail.
    pub job_pending_polls: u32,
    pub job_failure: Option<(u32, String)>,
    pub provision_done: Vec<String>,
    pub failure: Option<Failure>,
    /// (command, page) of every request that passed verification.
    pub accepted: Vec<(String, Option<u32>)>,
    /// Requests refused for their signature or expiry.
    pub rejected: Vec<String>,
    /// (User-Agent, command, arrival) of every request that passed
    /// verification: who called, in order (the bridge names node and term).
    pub callers: Vec<(String, String, std::time::Instant)>,
}

pub struct Sim {
    pub addr: SocketAddr,
    pub state: Arc<Mutex<SimState>>,
    shutdown: CancellationToken,
    task: Option<tokio::task::JoinHandle<()>>,
    tls: bool,
}

impl Sim {
    pub async fn start() -> Sim {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(Mutex::new(SimState::default()));
        let shutdown = CancellationToken::new();
        let app = Router::new()
            .route("/client/api", get(api))
            .with_state(state.clone());
        let token = shutdown.clone();
        let task = tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(token.cancelled_owned())
                .await
                .unwrap();
        });
        Sim {
            addr,
            state,
            shutdown,
            task: Some(task),
            tls: false,
        }
    }

    /// The same API over TLS with the given server certificate and key (PEM).
    pub async fn start_tls(cert_pem: &str, key_pem: &str) -> Sim {
        use rustls_pki_types::pem::PemObject;
        use rustls_pki_types::{CertificateDer, PrivateKeyDer};
        use tower::ServiceExt;
        let certs: Vec<CertificateDer<'static>> =
            CertificateDer::pem_slice_iter(cert_pem.as_bytes())
                .collect::<Result<_, _>>()
                .unwrap();
        let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).unwrap();
        let cfg = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(Mutex::new(SimState::default()));
        let shutdown = CancellationToken::new();
        let app = Router::new()
            .route("/client/api", get(api))
            .with_state(state.clone());
        let token = shutdown.clone();
        let task = tokio::spawn(async move {
            loop {
                let (tcp, _) = tokio::select! {
                    _ = token.cancelled() => return,
                    r = listener.accept() => match r { Ok(c) => c, Err(_) => continue },
                };
                let acceptor = acceptor.clone();
                let app = app.clone();
                tokio::spawn(async move {
                    // Handshake failures (an untrusting client) just end the connection.
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let svc = hyper::service::service_fn(
                        move |req: hyper::Request<hyper::body::Incoming>| {
                            app.clone().oneshot(req.map(axum::body::Body::new))
                        },
                    );
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(tls), svc)
                        .await;
                });
            }
        });
        Sim {
            addr,
            state,
            shutdown,
            task: Some(task),
            tls: true,
        }
    }

    pub fn url(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://{}/client/api", self.addr)
    }

    /// Stops serving; the port then refuses connections.
    pub async fn shutdown(&mut self) {
        self.shutdown.cancel();
        if let Some(t) = self.task.take() {
            let _ = tokio::time::timeout(std::time::Duration::from_secs(5), t).await;
        }
    }

    pub fn set(&self, collection: &str, items: Vec<Value>) {
        self.state
            .lock()
            .unwrap()
            .collections
            .insert(collection.to_string(), items);
    }

    pub fn fail_next(&self, f: Failure) {
        self.state.lock().unwrap().failure = Some(f);
    }

    pub fn pages_of(&self, command: &str) -> Vec<u32> {
        self.state
            .lock()
            .unwrap()
            .accepted
            .iter()
            .filter(|(c, _)| c.eq_ignore_ascii_case(command))
            .filter_map(|(_, p)| *p)
            .collect()
    }
}

impl Drop for Sim {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// Java's `URLEncoder.encode(v, "UTF-8")` followed by `replaceAll("\\+", "%20")`.
fn java_urlencode(v: &str) -> String {
    let mut out = String::new();
    for b in v.bytes() {
        match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'.' | b'-' | b'*' | b'_' => {
                out.push(b as char)
            }
            b' ' => out.push_str("%20"),
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

/// Servlet-style decoding of the raw query: '+' is a space, %XX a byte.
fn decode_query(raw: &str) -> Vec<(String, String)> {
    raw.split('&')
        .filter(|s| !s.is_empty())
        .map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let dec = |s: &str| {
                percent_encoding::percent_decode_str(&s.replace('+', " "))
                    .decode_utf8_lossy()
                    .into_owned()
            };
            (dec(k), dec(v))
        })
        .collect()
}

/// `yyyy-MM-ddTHH:mm:ss+0000` → unix seconds (UTC offsets only).
fn parse_expires(s: &str) -> Option<i64> {
    let (dt, off) = s.split_at(s.len().checked_sub(5)?);
    if off != "+0000" && off != "-0000" {
        return None;
    }
    let (date, time) = dt.split_once('T')?;
    let d: Vec<i64> = date
        .split('-')
        .map(|x| x.parse().ok())
        .collect::<Option<_>>()?;
    let t: Vec<i64> = time
        .split(':')
        .map(|x| x.parse().ok())
        .collect::<Option<_>>()?;
    if d.len() != 3 || t.len() != 3 {
        return None;
    }
    // days_from_civil
    let (y, m, day) = (d[0], d[1], d[2]);
    let y = if m <= 2 { y - 1 } else { y };
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let yoe = y - era * 400;
    let mp = if m > 2 { m - 3 } else { m + 9 };
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(days * 86_400 + t[0] * 3600 + t[1] * 60 + t[2])
}

fn verify(params: &[(String, String)]) -> Result<(), &'static str> {
    let get = |name: &str| {
        params
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    };
    let Some(sig) = get("signature") else {
        return Err("no signature");
    };
    if get("apikey") != Some(API_KEY) {
        return Err("unknown api key");
    }
    if get("signatureversion") != Some("3") {
        return Err("signatureVersion is not 3");
    }
    let Some(expires) = get("expires").and_then(parse_expires) else {
        return Err("missing or malformed expires");
    };
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    if expires < now {
        return Err("expired");
    }
    let mut names: Vec<&str> = params
        .iter()
        .map(|(k, _)| k.as_str())
        .filter(|k| !k.eq_ignore_ascii_case("signature"))
        .collect();
    names.sort();
    let unsigned = names
        .iter()
        .map(|n| format!("{n}={}", java_urlencode(get(n).unwrap_or(""))))
        .collect::<Vec<_>>()
        .join("&")
        .to_lowercase();
    let mut mac = Hmac::<Sha1>::new_from_slice(SECRET.as_bytes()).unwrap();
    mac.update(unsigned.as_bytes());
    let want = base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes());
    if want != sig {
        return Err("signature mismatch");
    }
    Ok(())
}

fn reply(status: u16, body: Value) -> Response {
    (
        StatusCode::from_u16(status).unwrap(),
        [(header::CONTENT_TYPE, "application/json; charset=UTF-8")],
        body.to_string(),
    )
        .into_response()
}

fn error(command: &str, status: u16, code: u32, text: &str) -> Response {
    let key = format!("{}response", command.to_lowercase());
    reply(
        status,
        json!({ key: {"uuidList": [], "errorcode": code, "cserrorcode": 9999, "errortext": text} }),
    )
}

/// What CloudStack's `BaremetalManagerImpl.notifyProvisionDone` does: the
/// instance on the host with this MAC must be `Starting`; it becomes
/// `Running`. Any other state is an error (530, "... is not in state of
/// Starting"): a repeated notification fails, it is not a no-op.
fn notify_provision_done(st: &mut SimState, mac: &str) -> Result<Value, (u32, String)> {
    let vms = st.collections.entry("vms".into()).or_default();
    let vm = vms.iter_mut().find(|v| {
        v.get("nic").and_then(Value::as_array).is_some_and(|nics| {
            nics.iter().any(|n| {
                n.get("macaddress")
                    .and_then(Value::as_str)
                    .is_some_and(|m| m.eq_ignore_ascii_case(mac))
            })
        })
    });
    let Some(vm) = vm else {
        return Err((530, format!("cannot find host[mac:{mac}]")));
    };
    let state = vm.get("state").and_then(Value::as_str).unwrap_or("");
    if state != "Starting" {
        return Err((
            530,
            format!("baremetal instance [state:{state}] is not in state of Starting"),
        ));
    }
    vm["state"] = json!("Running");
    Ok(json!({"success": true}))
}

/// Item key of each list command.
fn item_key(command: &str) -> Option<(&'static str, &'static str)> {
    Some(match command.to_lowercase().as_str() {
        "listzones" => ("zones", "zone"),
        "listpods" => ("pods", "pod"),
        "listhosts" => ("hosts", "host"),
        "listvirtualmachines" => ("vms", "virtualmachine"),
        "listtemplates" => ("templates", "template"),
        _ => return None,
    })
}

async fn api(
    State(state): State<Arc<Mutex<SimState>>>,
    headers: axum::http::HeaderMap,
    RawQuery(raw): RawQuery,
) -> Response {
    let params = decode_query(raw.as_deref().unwrap_or(""));
    let get = |name: &str| {
        params
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.clone())
    };
    let command = get("command").unwrap_or_default();
    let mut st = state.lock().unwrap();
    if let Err(why) = verify(&params) {
        st.rejected.push(format!("{command}: {why}"));
        return error(
            &command,
            401,
            401,
            "unable to verify user credentials and/or request signature",
        );
    }
    if get("response").as_deref() != Some("json") {
        return error(
            &command,
            431,
            431,
            "this simulator answers response=json only",
        );
    }
    let page: Option<u32> = get("page").and_then(|p| p.parse().ok());
    st.accepted.push((command.clone(), page));
    let ua = headers
        .get(header::USER_AGENT)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    st.callers
        .push((ua, command.clone(), std::time::Instant::now()));

    if let Some(f) = st.failure.as_mut() {
        let applies = f.command.is_none_or(|c| c.eq_ignore_ascii_case(&command));
        if f.count > 0 && applies {
            f.count -= 1;
            let f = f.clone();
            return match f.error {
                Some((code, text)) => error(&command, f.http_status, code, &text),
                None => (
                    StatusCode::from_u16(f.http_status).unwrap(),
                    [(header::CONTENT_TYPE, "text/html")],
                    "<html><body>502 Bad Gateway</body></html>",
                )
                    .into_response(),
            };
        }
    }

    let key = format!("{}response", command.to_lowercase());
    if let Some((coll, item)) = item_key(&command) {
        let all: Vec<Value> = st
            .collections
            .get(coll)
            .cloned()
            .unwrap_or_default()
            .into_iter()
            .filter(|v| {
                ["id", "hypervisor", "zoneid", "podid"]
                    .iter()
                    .all(|f| match get(f) {
                        Some(want) => v.get(*f).and_then(Value::as_str) == Some(want.as_str()),
                        None => true,
                    })
            })
            .collect();
        let total = all.len();
        let items: Vec<Value> = match (page, get("pagesize").and_then(|s| s.parse::<usize>().ok()))
        {
            (Some(p), Some(size)) if p >= 1 => all
                .into_iter()
                .skip((p as usize - 1) * size)
                .take(size)
                .collect(),
            (Some(_), None) => {
                return error(&command, 431, 431, "pagesize is required with page");
            }
            _ => all,
        };
        // A real server answers an empty page with an empty object.
        if items.is_empty() {
            return reply(200, json!({ key: {} }));
        }
        return reply(200, json!({ key: { "count": total, item: items } }));
    }
    match command.to_lowercase().as_str() {
        "notifybaremetalprovisiondone" => {
            let Some(mac) = get("mac") else {
                return error(&command, 431, 431, "Unable to execute API command notifybaremetalprovisiondone due to missing parameter mac");
            };
            st.provision_done.push(mac.clone());
            st.next_job += 1;
            let jobid = format!("0000-job-{}", st.next_job);
            let outcome = match st.job_failure.clone() {
                Some(e) => Err(e),
                None => notify_provision_done(&mut st, &mac),
            };
            let pending = st.job_pending_polls;
            st.jobs.insert(
                jobid.clone(),
                Job {
                    command: command.clone(),
                    pending_polls: pending,
                    polls: 0,
                    outcome,
                },
            );
            reply(200, json!({ key: { "jobid": jobid } }))
        }
        "queryasyncjobresult" => {
            let jobid = get("jobid").unwrap_or_default();
            let Some(job) = st.jobs.get_mut(&jobid) else {
                return error(
                    &command,
                    431,
                    431,
                    &format!("Unable to find job by id {jobid}"),
                );
            };
            job.polls += 1;
            if job.polls <= job.pending_polls {
                return reply(
                    200,
                    json!({ key: {
                        "jobid": jobid, "jobstatus": 0, "jobprocstatus": 0, "jobresultcode": 0,
                        "cmd": "org.apache.cloudstack.api.BaremetalProvisionDoneNotificationCmd"
                    }}),
                );
            }
            match &job.outcome {
                Ok(result) => reply(
                    200,
                    json!({ key: {
                        "jobid": jobid, "jobstatus": 1, "jobprocstatus": 0, "jobresultcode": 0,
                        "jobresulttype": "object", "jobresult": result
                    }}),
                ),
                Err((code, text)) => reply(
                    200,
                    json!({ key: {
                        "jobid": jobid, "jobstatus": 2, "jobprocstatus": 0, "jobresultcode": 530,
                        "jobresulttype": "object",
                        "jobresult": {"errorcode": code, "errortext": text}
                    }}),
                ),
            }
        }
        _ => error(
            &command,
            432,
            432,
            "The given command does not exist or it is not available for user",
        ),
    }
}
