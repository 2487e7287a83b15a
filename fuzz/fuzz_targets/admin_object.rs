//! A record as an administrator's `Put`/`Apply` carries it: protobuf
//! `Object` bytes (prost decode), the coordinator's per-kind validation and
//! conversion (`rack/network/host/profile/image_from_proto`: names, MACs,
//! IPs, CIDRs, VLAN, MTU, pools, labels, BMC fields, digests), as
//! `AdminService::record_from_object` dispatches it. A record we accept must
//! survive the trip back to protobuf and in again unchanged.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pb::object::Record as O;
use prost::Message;
use pxemesh_coordinator::api::convert::{
    host_from_proto, image_from_proto, network_from_proto, profile_from_proto, rack_from_proto,
    record_to_proto,
};
use pxemesh_coordinator::model::Record;
use pxemesh_proto::v1 as pb;

/// What `record_from_object` makes of an object (BMC password aside: the
/// service seals it, which needs the cluster key).
fn convert(obj: &pb::Object) -> Option<Record> {
    Some(match obj.record.as_ref()? {
        O::Rack(r) => Record::Rack(rack_from_proto(r).ok()?),
        O::Network(n) => Record::Network(network_from_proto(n).ok()?),
        O::Host(h) => Record::Host(host_from_proto(h).ok()?.0),
        O::Profile(p) => Record::Profile(profile_from_proto(p).ok()?),
        O::Image(i) => Record::Image(image_from_proto(i).ok()?),
        O::Job(_) | O::Relay(_) => return None,
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(obj) = pb::Object::decode(data) else {
        return;
    };
    let Some(rec) = convert(&obj) else {
        return;
    };
    let back = record_to_proto(&rec);
    let again = convert(&back);
    assert_eq!(again.as_ref(), Some(&rec), "round trip changed the record");
});
