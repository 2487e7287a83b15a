//! The CloudStack client's logs never carry the secret key. Alone in its
//! own test binary: tracing caches per-callsite interest process-wide, so a
//! thread-local subscriber must not race other tests hitting the same
//! callsites.

mod cloudstack_sim;

use std::time::Duration;

use cloudstack_sim::{Sim, API_KEY, SECRET};
use pxemesh_coordinator::cloudstack::model::CsHost;
use pxemesh_coordinator::cloudstack::{notify_provision_done, Client, ClientSettings, SecretKey};
use serde_json::json;

fn settings(sim: &Sim) -> ClientSettings {
    let mut s = ClientSettings::new(&sim.url(), API_KEY, SecretKey::new(SECRET).unwrap());
    s.request_timeout = Duration::from_secs(5);
    s.poll_initial = Duration::from_millis(10);
    s.poll_max = Duration::from_millis(50);
    s
}

fn host(i: usize) -> serde_json::Value {
    json!({"id": format!("h-{i}"), "name": format!("bm-{i}"), "hypervisor": "BareMetal",
           "zoneid": "z1", "podid": "p1"})
}

/// Everything logged at TRACE level (ours, reqwest's, hyper's) during signed
/// calls, a failed call and an async job: the secret key never appears.
#[tokio::test]
async fn secret_key_is_never_logged() {
    use std::io::Write;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Capture(Arc<Mutex<Vec<u8>>>);
    impl Write for Capture {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let cap = Capture::default();
    let writer = cap.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new("trace"))
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .finish();
    // Current-thread runtime: the simulator's tasks log through this too.
    let _guard = tracing::subscriber::set_default(subscriber);

    let sim = Sim::start().await;
    sim.set("hosts", (0..4).map(host).collect());
    // The instance the notification is for (the simulator, like CloudStack,
    // refuses a notify for a MAC without a Starting instance).
    sim.set(
        "vms",
        vec![
            serde_json::json!({"id": "v-1", "name": "inst-1", "state": "Starting",
            "hypervisor": "BareMetal",
            "nic": [{"id": "n-1", "macaddress": "52:54:00:00:01:01", "isdefault": true}]}),
        ],
    );
    let mut s = settings(&sim);
    s.page_size = 3;
    let c = Client::new(s).unwrap();
    let hosts: Vec<CsHost> = c.list_all("listHosts", &[], "host").await.unwrap();
    assert_eq!(hosts.len(), 4);
    notify_provision_done(&c, "52:54:00:00:01:01")
        .await
        .unwrap();
    let mut bad = settings(&sim);
    bad.secret_key = SecretKey::new("wrong").unwrap();
    assert!(Client::new(bad)
        .unwrap()
        .call("listZones", &[])
        .await
        .is_err());

    let text = String::from_utf8_lossy(&cap.0.lock().unwrap()).into_owned();
    assert!(text.contains("cloudstack call"), "capture works:\n{text}");
    assert!(text.contains("cloudstack async job succeeded"), "{text}");
    assert!(!text.contains(SECRET), "secret key in the logs:\n{text}");
}
