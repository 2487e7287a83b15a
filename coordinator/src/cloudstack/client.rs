//! Async CloudStack API client: signed GETs, typed errors, paging, async-job
//! polling, a token-bucket rate limit, TLS verified against the system roots
//! or a configured CA.
//!
//! Nothing here logs or returns the secret key, and transport errors are
//! stripped of their URL (it carries the api key and the signature).

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use serde::de::DeserializeOwned;
use serde_json::Value;
use tokio::sync::Mutex;

use super::config::CloudStackConfig;
use super::sign::{self, SecretKey};

/// Errors of one API call, by where they come from.
#[derive(Debug, thiserror::Error)]
pub enum CsError {
    /// The management server answered with an error object.
    #[error("CloudStack {command}: HTTP {http_status}, errorcode {errorcode}: {errortext}")]
    Api {
        command: String,
        http_status: u16,
        errorcode: u32,
        cserrorcode: Option<u32>,
        errortext: String,
    },
    /// A non-success HTTP status without a CloudStack error object (a proxy,
    /// a load balancer, a half-started server).
    #[error("CloudStack {command}: HTTP {http_status} without a CloudStack error body")]
    Http { command: String, http_status: u16 },
    /// Connecting, TLS, sending or reading the response failed.
    #[error("CloudStack {command}: transport error: {source}")]
    Transport {
        command: String,
        #[source]
        source: reqwest::Error,
    },
    /// The answer was not the JSON we expected.
    #[error("CloudStack {command}: cannot decode the response: {detail}")]
    Decode { command: String, detail: String },
    /// The async job finished with jobstatus 2.
    #[error("CloudStack {command}: async job {jobid} failed (errorcode {errorcode}): {errortext}")]
    AsyncJobFailed {
        command: String,
        jobid: String,
        errorcode: u32,
        errortext: String,
    },
    /// The async job was still pending when the deadline passed.
    #[error("CloudStack {command}: async job {jobid} still pending after {waited:?}")]
    Timeout {
        command: String,
        jobid: String,
        waited: Duration,
    },
    #[error("CloudStack client configuration: {0}")]
    Config(String),
}

impl CsError {
    fn outcome(&self) -> &'static str {
        match self {
            CsError::Api { .. } => "api_error",
            CsError::Http { .. } => "http_error",
            CsError::Transport { .. } => "transport_error",
            CsError::Decode { .. } => "decode_error",
            CsError::AsyncJobFailed { .. } => "job_failed",
            CsError::Timeout { .. } => "timeout",
            CsError::Config(_) => "config_error",
        }
    }
}

/// Settings of the client itself (a subset of [`CloudStackConfig`]).
#[derive(Debug, Clone)]
pub struct ClientSettings {
    /// API endpoint, e.g. `https://cs.example.org:8443/client/api`.
    pub url: String,
    pub api_key: String,
    pub secret_key: SecretKey,
    /// PEM file of the CA that signed the management server's certificate;
    /// `None` uses the system trust store.
    pub ca_file: Option<std::path::PathBuf>,
    /// Sustained calls per second and burst size of the token bucket.
    pub rate_per_second: f64,
    pub burst: u32,
    /// Per-request timeout (connect + answer).
    pub request_timeout: Duration,
    /// How far in the future `expires` is set.
    pub signature_lifetime: Duration,
    /// Page size of `list_all`.
    pub page_size: u32,
    /// Upper bound of pages fetched by one `list_all` (a server that never
    /// returns a short page cannot keep us looping).
    pub max_pages: u32,
    /// Deadline of one `call_async`, and its polling back-off.
    pub async_deadline: Duration,
    pub poll_initial: Duration,
    pub poll_max: Duration,
}

impl ClientSettings {
    pub fn from_config(cfg: &CloudStackConfig) -> Result<ClientSettings, CsError> {
        let secret_key = SecretKey::from_file(&cfg.secret_key_file).map_err(CsError::Config)?;
        Ok(ClientSettings {
            url: cfg.url.clone(),
            api_key: cfg.api_key.clone(),
            secret_key,
            ca_file: cfg.ca_file.clone(),
            rate_per_second: cfg.rate_limit_per_second,
            burst: cfg.rate_limit_burst,
            request_timeout: Duration::from_secs(cfg.request_timeout_seconds),
            signature_lifetime: Duration::from_secs(cfg.signature_lifetime_seconds),
            page_size: cfg.page_size,
            max_pages: 10_000,
            async_deadline: Duration::from_secs(cfg.async_job_timeout_seconds),
            poll_initial: Duration::from_millis(250),
            poll_max: Duration::from_secs(5),
        })
    }

    /// Defaults for everything but the endpoint and the keys.
    pub fn new(url: &str, api_key: &str, secret_key: SecretKey) -> ClientSettings {
        ClientSettings {
            url: url.to_string(),
            api_key: api_key.to_string(),
            secret_key,
            ca_file: None,
            rate_per_second: 10.0,
            burst: 20,
            request_timeout: Duration::from_secs(30),
            signature_lifetime: Duration::from_secs(300),
            page_size: 500,
            max_pages: 10_000,
            async_deadline: Duration::from_secs(600),
            poll_initial: Duration::from_millis(250),
            poll_max: Duration::from_secs(5),
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
pub struct CallLabels {
    pub command: String,
    pub outcome: String,
}

/// Prometheus counters of the client.
#[derive(Default, Clone)]
pub struct ClientMetrics {
    /// HTTP calls by command and outcome (`ok`, `api_error`, ...).
    pub calls: Family<CallLabels, Counter>,
    /// Time spent waiting for the rate limiter, in milliseconds.
    pub throttled_ms: Counter,
    /// queryAsyncJobResult polls.
    pub job_polls: Counter,
}

impl ClientMetrics {
    pub fn register(&self, registry: &mut Registry) {
        let sub = registry.sub_registry_with_prefix("cloudstack");
        sub.register(
            "api_calls",
            "CloudStack API calls by command and outcome",
            self.calls.clone(),
        );
        sub.register(
            "throttled_milliseconds",
            "Time CloudStack calls waited for the rate limiter",
            self.throttled_ms.clone(),
        );
        sub.register(
            "async_job_polls",
            "queryAsyncJobResult polls",
            self.job_polls.clone(),
        );
    }
}

struct Bucket {
    tokens: f64,
    last: Instant,
}

/// Token bucket: `rate` tokens per second, at most `burst` stored.
struct RateLimiter {
    rate: f64,
    burst: f64,
    state: Mutex<Bucket>,
}

impl RateLimiter {
    fn new(rate: f64, burst: u32) -> RateLimiter {
        let burst = f64::from(burst.max(1));
        RateLimiter {
            rate,
            burst,
            state: Mutex::new(Bucket {
                tokens: burst,
                last: Instant::now(),
            }),
        }
    }

    /// Takes one token, sleeping until one is available. Returns the wait.
    async fn acquire(&self) -> Duration {
        let mut waited = Duration::ZERO;
        loop {
            let wait = {
                let mut b = self.state.lock().await;
                let now = Instant::now();
                let refill = now.duration_since(b.last).as_secs_f64() * self.rate;
                b.tokens = (b.tokens + refill).min(self.burst);
                b.last = now;
                if b.tokens >= 1.0 {
                    b.tokens -= 1.0;
                    return waited;
                }
                Duration::from_secs_f64((1.0 - b.tokens) / self.rate)
            };
            tokio::time::sleep(wait).await;
            waited += wait;
        }
    }
}

/// A CloudStack API client. Cheap to clone.
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

struct Inner {
    http: reqwest::Client,
    base: reqwest::Url,
    settings: ClientSettings,
    limiter: RateLimiter,
    metrics: ClientMetrics,
}

/// Parameters of one call, as given by the caller (no `command`, `apikey`,
/// `response`, `signature`, `signatureversion`, `expires`: the client adds them).
pub type Params = Vec<(String, String)>;

pub fn params(pairs: &[(&str, &str)]) -> Params {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

impl Client {
    pub fn new(settings: ClientSettings) -> Result<Client, CsError> {
        Client::with_metrics(settings, ClientMetrics::default(), None)
    }

    /// Like `new`, counting into `metrics` (registered by the caller) and
    /// sending `user_agent` (the bridge names its node and term in it).
    pub fn with_metrics(
        settings: ClientSettings,
        metrics: ClientMetrics,
        user_agent: Option<String>,
    ) -> Result<Client, CsError> {
        let base = reqwest::Url::parse(&settings.url)
            .map_err(|e| CsError::Config(format!("url {:?}: {e}", settings.url)))?;
        match base.scheme() {
            "http" | "https" => {}
            other => {
                return Err(CsError::Config(format!(
                    "url {:?}: scheme {other:?} is neither http nor https",
                    settings.url
                )))
            }
        }
        if base.query().is_some() {
            return Err(CsError::Config(format!(
                "url {:?} must not carry a query string",
                settings.url
            )));
        }
        if settings.api_key.trim().is_empty() {
            return Err(CsError::Config("api_key is empty".into()));
        }
        if !(settings.rate_per_second > 0.0 && settings.rate_per_second.is_finite()) {
            return Err(CsError::Config(
                "the rate limit must be a positive number of calls per second".into(),
            ));
        }
        if settings.page_size == 0 {
            return Err(CsError::Config("page_size must be at least 1".into()));
        }
        let tls = tls_config(settings.ca_file.as_deref())?;
        let http = reqwest::Client::builder()
            .user_agent(user_agent.unwrap_or_else(|| "pxemesh".to_string()))
            .use_preconfigured_tls(tls)
            .timeout(settings.request_timeout)
            .connect_timeout(settings.request_timeout.min(Duration::from_secs(10)))
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| CsError::Config(format!("HTTP client: {e}")))?;
        let limiter = RateLimiter::new(settings.rate_per_second, settings.burst);
        Ok(Client {
            inner: Arc::new(Inner {
                http,
                base,
                settings,
                limiter,
                metrics,
            }),
        })
    }

    pub fn metrics(&self) -> &ClientMetrics {
        &self.inner.metrics
    }

    pub fn settings(&self) -> &ClientSettings {
        &self.inner.settings
    }

    /// One synchronous command. Returns the object inside
    /// `{"<command>response": {...}}`.
    pub async fn call(&self, command: &str, params: &[(String, String)]) -> Result<Value, CsError> {
        let result = self.call_inner(command, params).await;
        let outcome = match &result {
            Ok(_) => "ok",
            Err(e) => e.outcome(),
        };
        self.inner
            .metrics
            .calls
            .get_or_create(&CallLabels {
                command: command.to_string(),
                outcome: outcome.to_string(),
            })
            .inc();
        result
    }

    async fn call_inner(
        &self,
        command: &str,
        params: &[(String, String)],
    ) -> Result<Value, CsError> {
        let s = &self.inner.settings;
        let waited = self.inner.limiter.acquire().await;
        if !waited.is_zero() {
            self.inner
                .metrics
                .throttled_ms
                .inc_by(waited.as_millis() as u64);
        }
        let mut all: Vec<(String, String)> = params
            .iter()
            .filter(|(k, _)| {
                !matches!(
                    k.to_ascii_lowercase().as_str(),
                    "command"
                        | "apikey"
                        | "response"
                        | "signature"
                        | "signatureversion"
                        | "expires"
                )
            })
            .cloned()
            .collect();
        all.push(("command".into(), command.into()));
        all.push(("apikey".into(), s.api_key.clone()));
        all.push(("response".into(), "json".into()));
        all.push(("signatureversion".into(), "3".into()));
        all.push((
            "expires".into(),
            sign::expires_at(SystemTime::now() + s.signature_lifetime),
        ));
        let mut url = self.inner.base.clone();
        url.set_query(Some(&sign::signed_query(&all, &s.secret_key)));

        let started = Instant::now();
        let resp = self
            .inner
            .http
            .get(url)
            .send()
            .await
            .map_err(|e| CsError::Transport {
                command: command.into(),
                source: e.without_url(),
            })?;
        let status = resp.status();
        let body = resp.bytes().await.map_err(|e| CsError::Transport {
            command: command.into(),
            source: e.without_url(),
        })?;
        tracing::debug!(
            command,
            status = status.as_u16(),
            bytes = body.len(),
            elapsed_ms = started.elapsed().as_millis() as u64,
            "cloudstack call"
        );
        decode_answer(command, status.as_u16(), &body)
    }

    /// Every item of a list command, page by page (`page`, `pagesize`), until
    /// a short or empty page, the advertised `count`, or `max_pages`.
    pub async fn list_all<T: DeserializeOwned>(
        &self,
        command: &str,
        params: &[(String, String)],
        item_key: &str,
    ) -> Result<Vec<T>, CsError> {
        let page_size = self.inner.settings.page_size;
        let mut out: Vec<T> = Vec::new();
        for page in 1..=self.inner.settings.max_pages {
            let mut p: Vec<(String, String)> = params
                .iter()
                .filter(|(k, _)| !matches!(k.to_ascii_lowercase().as_str(), "page" | "pagesize"))
                .cloned()
                .collect();
            p.push(("page".into(), page.to_string()));
            p.push(("pagesize".into(), page_size.to_string()));
            let answer = self.call(command, &p).await?;
            let (items, count) = decode_page::<T>(command, &answer, item_key)?;
            let n = items.len();
            out.extend(items);
            tracing::debug!(command, page, items = n, count, "cloudstack list page");
            if n < page_size as usize || count.is_some_and(|c| out.len() as u64 >= c) {
                return Ok(out);
            }
        }
        Err(CsError::Decode {
            command: command.into(),
            detail: format!(
                "still full pages after {} pages of {page_size}",
                self.inner.settings.max_pages
            ),
        })
    }

    /// An asynchronous command: submits it, then polls `queryAsyncJobResult`
    /// with back-off until jobstatus 1 (returns `jobresult`), 2
    /// ([`CsError::AsyncJobFailed`]) or the deadline ([`CsError::Timeout`]).
    pub async fn call_async(
        &self,
        command: &str,
        params: &[(String, String)],
    ) -> Result<Value, CsError> {
        let submitted = self.call(command, params).await?;
        let jobid = match submitted.get("jobid") {
            Some(Value::String(s)) => s.clone(),
            Some(Value::Number(n)) => n.to_string(),
            _ => {
                return Err(CsError::Decode {
                    command: command.into(),
                    detail: "the answer to an async command carries no jobid".into(),
                })
            }
        };
        let s = &self.inner.settings;
        let started = Instant::now();
        let mut delay = s.poll_initial;
        loop {
            let answer = self
                .call("queryAsyncJobResult", &self::params(&[("jobid", &jobid)]))
                .await?;
            self.inner.metrics.job_polls.inc();
            match answer.get("jobstatus").and_then(Value::as_i64) {
                Some(0) => {}
                Some(1) => {
                    tracing::info!(
                        command,
                        jobid,
                        elapsed_ms = started.elapsed().as_millis() as u64,
                        "cloudstack async job succeeded"
                    );
                    return Ok(answer.get("jobresult").cloned().unwrap_or(Value::Null));
                }
                Some(2) => {
                    let r = answer.get("jobresult");
                    let errortext = r
                        .and_then(|r| r.get("errortext"))
                        .and_then(Value::as_str)
                        .unwrap_or("(no errortext)")
                        .to_string();
                    let errorcode = r
                        .and_then(|r| r.get("errorcode"))
                        .and_then(Value::as_u64)
                        .or_else(|| answer.get("jobresultcode").and_then(Value::as_u64))
                        .unwrap_or(0) as u32;
                    tracing::warn!(
                        command,
                        jobid,
                        errorcode,
                        errortext,
                        "cloudstack async job failed"
                    );
                    return Err(CsError::AsyncJobFailed {
                        command: command.into(),
                        jobid,
                        errorcode,
                        errortext,
                    });
                }
                other => {
                    return Err(CsError::Decode {
                        command: "queryAsyncJobResult".into(),
                        detail: format!("unexpected jobstatus {other:?} for job {jobid}"),
                    })
                }
            }
            let elapsed = started.elapsed();
            if elapsed >= s.async_deadline {
                return Err(CsError::Timeout {
                    command: command.into(),
                    jobid,
                    waited: elapsed,
                });
            }
            tokio::time::sleep(delay.min(s.async_deadline - elapsed)).await;
            delay = (delay * 2).min(s.poll_max);
        }
    }
}

fn kind_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// The items of one page of a list answer (`answer[item_key]`, absent or
/// null = none) and its advertised `count`.
pub fn decode_page<T: DeserializeOwned>(
    command: &str,
    answer: &Value,
    item_key: &str,
) -> Result<(Vec<T>, Option<u64>), CsError> {
    let items = match answer.get(item_key) {
        None | Some(Value::Null) => &[][..],
        Some(Value::Array(a)) => a.as_slice(),
        Some(other) => {
            return Err(CsError::Decode {
                command: command.into(),
                detail: format!("{item_key} is not an array but {}", kind_of(other)),
            })
        }
    };
    let mut out = Vec::with_capacity(items.len());
    for item in items {
        out.push(T::deserialize(item).map_err(|e| CsError::Decode {
            command: command.into(),
            detail: format!("{item_key} item: {e}"),
        })?);
    }
    Ok((out, answer.get("count").and_then(Value::as_u64)))
}

/// Unwraps `{"<command lower-cased>response": {...}}` and maps error objects
/// and statuses to [`CsError`].
pub fn decode_answer(command: &str, http_status: u16, body: &[u8]) -> Result<Value, CsError> {
    let parsed: Result<Value, _> = serde_json::from_slice(body);
    let success = (200..300).contains(&http_status);
    let value = match parsed {
        Ok(v) => v,
        Err(e) => {
            if success {
                return Err(CsError::Decode {
                    command: command.into(),
                    detail: format!("not JSON: {e}"),
                });
            }
            return Err(CsError::Http {
                command: command.into(),
                http_status,
            });
        }
    };
    let Value::Object(outer) = value else {
        return Err(CsError::Decode {
            command: command.into(),
            detail: "the answer is not a JSON object".into(),
        });
    };
    let key = format!("{}response", command.to_ascii_lowercase());
    let inner = match outer.get(&key) {
        Some(v) => v.clone(),
        // Some commands answer under another name (and error answers of a
        // few servers use "errorresponse"): accept a single *response key.
        None => {
            let mut responses = outer.iter().filter(|(k, _)| k.ends_with("response"));
            match (responses.next(), responses.next()) {
                (Some((_, v)), None) => v.clone(),
                _ => {
                    if !success {
                        return Err(CsError::Http {
                            command: command.into(),
                            http_status,
                        });
                    }
                    return Err(CsError::Decode {
                        command: command.into(),
                        detail: format!("no {key:?} object in the answer"),
                    });
                }
            }
        }
    };
    let errorcode = inner.get("errorcode").and_then(Value::as_u64);
    if let Some(code) = errorcode {
        return Err(CsError::Api {
            command: command.into(),
            http_status,
            errorcode: code as u32,
            cserrorcode: inner
                .get("cserrorcode")
                .and_then(Value::as_u64)
                .map(|c| c as u32),
            errortext: inner
                .get("errortext")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string(),
        });
    }
    if !success {
        return Err(CsError::Http {
            command: command.into(),
            http_status,
        });
    }
    Ok(inner)
}

pub(crate) fn tls_config(
    ca_file: Option<&std::path::Path>,
) -> Result<rustls::ClientConfig, CsError> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::CertificateDer;
    let mut roots = rustls::RootCertStore::empty();
    match ca_file {
        Some(path) => {
            let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
                .map_err(|e| CsError::Config(format!("ca_file {}: {e}", path.display())))?
                .collect::<Result<_, _>>()
                .map_err(|e| CsError::Config(format!("ca_file {}: {e}", path.display())))?;
            if certs.is_empty() {
                return Err(CsError::Config(format!(
                    "ca_file {} holds no CERTIFICATE block",
                    path.display()
                )));
            }
            for c in certs {
                roots
                    .add(c)
                    .map_err(|e| CsError::Config(format!("ca_file {}: {e}", path.display())))?;
            }
        }
        None => {
            let native = rustls_native_certs::load_native_certs();
            for c in native.certs {
                // Skip the odd unparsable system certificate rather than fail.
                let _ = roots.add(c);
            }
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| CsError::Config(format!("TLS: {e}")))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(cfg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decode_page_reads_items_and_count() {
        #[derive(serde::Deserialize, Debug, PartialEq)]
        struct Z {
            id: String,
        }
        let v: Value = serde_json::json!({"count": 2, "zone": [{"id": "a"}, {"id": "b"}]});
        let (items, count) = decode_page::<Z>("listZones", &v, "zone").unwrap();
        assert_eq!(items, vec![Z { id: "a".into() }, Z { id: "b".into() }]);
        assert_eq!(count, Some(2));
        let (items, count) =
            decode_page::<Z>("listZones", &serde_json::json!({"zone": null}), "zone").unwrap();
        assert!(items.is_empty() && count.is_none());
        for bad in [
            serde_json::json!({"zone": {"id": "a"}}),
            serde_json::json!({"zone": [{"id": 7}]}),
        ] {
            assert!(matches!(
                decode_page::<Z>("listZones", &bad, "zone"),
                Err(CsError::Decode { .. })
            ));
        }
    }

    #[test]
    fn decode_unwraps_and_maps_errors() {
        let ok = br#"{"listzonesresponse":{"count":1,"zone":[{"id":"z1","name":"Z"}]}}"#;
        let v = decode_answer("listZones", 200, ok).unwrap();
        assert_eq!(v["zone"][0]["name"], "Z");

        let err = br#"{"listhostsresponse":{"uuidList":[],"errorcode":401,"errortext":"unable to verify user credentials and/or request signature"}}"#;
        match decode_answer("listHosts", 401, err) {
            Err(CsError::Api {
                http_status: 401,
                errorcode: 401,
                errortext,
                ..
            }) => assert!(errortext.contains("signature")),
            other => panic!("{other:?}"),
        }
        let err431 = br#"{"deployvirtualmachineresponse":{"errorcode":431,"cserrorcode":4350,"errortext":"bad"}}"#;
        assert!(matches!(
            decode_answer("deployVirtualMachine", 431, err431),
            Err(CsError::Api {
                errorcode: 431,
                cserrorcode: Some(4350),
                ..
            })
        ));
        assert!(matches!(
            decode_answer("listZones", 502, b"<html>bad gateway</html>"),
            Err(CsError::Http {
                http_status: 502,
                ..
            })
        ));
        assert!(matches!(
            decode_answer("listZones", 200, b"<html>"),
            Err(CsError::Decode { .. })
        ));
        // async submit answers under the command's own response name
        let sub = br#"{"baremetalprovisiondoneresponse":{"jobid":"j-1"}}"#;
        assert_eq!(
            decode_answer("notifyBaremetalProvisionDone", 200, sub).unwrap()["jobid"],
            "j-1"
        );
    }

    #[tokio::test]
    async fn token_bucket_spaces_calls() {
        let rl = RateLimiter::new(20.0, 2);
        let t = Instant::now();
        for _ in 0..6 {
            rl.acquire().await;
        }
        // 2 from the burst, 4 at 20/s = >= 200 ms.
        let e = t.elapsed();
        assert!(e >= Duration::from_millis(180), "{e:?}");
        assert!(e < Duration::from_secs(2), "{e:?}");
    }
}
