//! Kubernetes Services, for transparent outbound: a meshed pod that calls a Service's
//! ClusterIP is captured in its own network namespace, before kube-proxy picks an endpoint,
//! so its proxy sees the ClusterIP — an address no workload registers. The control plane
//! lists the cluster's Services and EndpointSlices and pushes the **service table**
//! (`ClusterIP:port` → the ready endpoints' `podIP:targetPort`) to every proxy on the watch
//! stream beside the endpoint registry; a proxy sends a call to a ClusterIP to one of the
//! endpoints the registry knows, over mTLS, requiring that endpoint's identity.
//!
//! Where it sits: a side task of the control plane, started when Kubernetes integration is
//! on (`--k8s-attestation`). It re-lists every [`SYNC_EVERY`] with the TokenReview client's
//! credentials (RBAC: `list` on `services` and `discovery.k8s.io/endpointslices`) and swaps
//! the table whole when it changed. A failed listing keeps the last table (and says so in
//! the log): an API server hiccup must not make every Service call look like egress.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;

use crate::api::ServiceEntry;
use crate::kube::{KubeError, TokenReviewer};
use crate::state::Shared;

/// How often the Services and EndpointSlices are listed.
pub const SYNC_EVERY: Duration = Duration::from_secs(10);

const SERVICES_PATH: &str = "/api/v1/services";
const SLICES_PATH: &str = "/apis/discovery.k8s.io/v1/endpointslices";
const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// The service table from the `items` of a `ServiceList` and an `EndpointSliceList` (as the
/// API server returns them): for every TCP port of every Service with a ClusterIP, the ready endpoints
/// of the slices labelled with its name, at the slice port of the same name. Sorted, so the
/// same cluster state gives the same table.
pub fn service_table(services: &[Value], slices: &[Value]) -> Vec<ServiceEntry> {
    // (namespace, service, port name) → ready endpoints.
    let mut endpoints: BTreeMap<(&str, &str, &str), Vec<SocketAddr>> = BTreeMap::new();
    for slice in slices {
        let ns = slice["metadata"]["namespace"].as_str().unwrap_or("");
        let Some(service) = slice["metadata"]["labels"][SERVICE_NAME_LABEL].as_str() else { continue };
        let ready: Vec<IpAddr> = array(&slice["endpoints"])
            .filter(|e| e["conditions"]["ready"].as_bool() != Some(false))
            .flat_map(|e| array(&e["addresses"]).filter_map(|a| a.as_str()?.parse().ok()))
            .collect();
        for port in array(&slice["ports"]).filter(|p| is_tcp(p)) {
            let Some(number) = port["port"].as_u64().and_then(|n| u16::try_from(n).ok()) else { continue };
            let name = port["name"].as_str().unwrap_or("");
            let list = endpoints.entry((ns, service, name)).or_default();
            list.extend(ready.iter().map(|ip| SocketAddr::new(*ip, number)));
        }
    }
    let mut table = Vec::new();
    for service in services {
        let (ns, name) =
            (service["metadata"]["namespace"].as_str().unwrap_or(""), service["metadata"]["name"].as_str());
        let Some(name) = name else { continue };
        for ip in cluster_ips(&service["spec"]) {
            for port in array(&service["spec"]["ports"]).filter(|p| is_tcp(p)) {
                let Some(number) = port["port"].as_u64().and_then(|n| u16::try_from(n).ok()) else { continue };
                let port_name = port["name"].as_str().unwrap_or("");
                let mut eps: Vec<String> = endpoints
                    .get(&(ns, name, port_name))
                    .into_iter()
                    .flatten()
                    .filter(|e| e.is_ipv4() == ip.is_ipv4())
                    .map(ToString::to_string)
                    .collect();
                eps.sort();
                eps.dedup();
                table.push(ServiceEntry { address: SocketAddr::new(ip, number).to_string(), endpoints: eps });
            }
        }
    }
    table.sort_by(|a, b| a.address.cmp(&b.address));
    table
}

/// A Service's virtual IPs: none for headless (`None`) and ExternalName Services, whose
/// names resolve to the pods (or elsewhere) directly.
fn cluster_ips(spec: &Value) -> Vec<IpAddr> {
    if spec["type"] == "ExternalName" {
        return Vec::new();
    }
    let listed: Vec<&str> = array(&spec["clusterIPs"]).filter_map(Value::as_str).collect();
    let ips = if listed.is_empty() { spec["clusterIP"].as_str().into_iter().collect() } else { listed };
    ips.into_iter().filter_map(|ip| ip.parse().ok()).collect()
}

fn is_tcp(port: &Value) -> bool {
    port["protocol"].as_str().is_none_or(|p| p == "TCP")
}

fn array(v: &Value) -> impl Iterator<Item = &Value> {
    v.as_array().into_iter().flatten()
}

/// Lists both kinds once and builds the table.
pub async fn list_table(client: &TokenReviewer) -> Result<Vec<ServiceEntry>, KubeError> {
    let services = client.list(SERVICES_PATH).await?;
    let slices = client.list(SLICES_PATH).await?;
    Ok(service_table(&services, &slices))
}

/// Keeps the control plane's service table in step with the cluster until the task is
/// dropped.
pub async fn sync_loop(shared: Arc<Shared>, client: TokenReviewer, every: Duration) {
    let mut failing = false;
    loop {
        match list_table(&client).await {
            Ok(table) => {
                if failing {
                    tracing::info!("listing Services works again");
                    failing = false;
                }
                if shared.set_services(table) {
                    tracing::info!(entries = shared.services.load().entries.len(), "service table updated");
                }
            }
            Err(e) if !failing => {
                tracing::warn!(error = %e, "cannot list Services and EndpointSlices; keeping the last service table");
                failing = true;
            }
            Err(e) => tracing::debug!(error = %e, "still cannot list Services"),
        }
        tokio::time::sleep(every).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn svc(ns: &str, name: &str, spec: Value) -> Value {
        json!({ "metadata": { "namespace": ns, "name": name }, "spec": spec })
    }

    fn slice(ns: &str, service: &str, ports: Value, endpoints: Value) -> Value {
        json!({
            "metadata": { "namespace": ns, "name": format!("{service}-x1"), "labels": { SERVICE_NAME_LABEL: service } },
            "addressType": "IPv4", "ports": ports, "endpoints": endpoints,
        })
    }

    #[test]
    fn cluster_ips_map_to_the_ready_endpoints_at_the_target_port() {
        let services = json!([
            svc(
                "shop",
                "api",
                json!({ "clusterIP": "10.96.0.10", "clusterIPs": ["10.96.0.10"],
                "ports": [{ "name": "http", "port": 80, "targetPort": 8080 }, { "name": "dns", "port": 53, "protocol": "UDP" }] })
            ),
            svc("shop", "db", json!({ "clusterIP": "10.96.0.11", "ports": [{ "port": 5432 }] })),
            svc("shop", "headless", json!({ "clusterIP": "None", "ports": [{ "port": 80 }] })),
            svc("shop", "external", json!({ "type": "ExternalName", "externalName": "example.com" })),
            svc("other", "api", json!({ "clusterIP": "10.96.0.12", "ports": [{ "name": "http", "port": 80 }] })),
        ]);
        let slices = json!([
            slice(
                "shop",
                "api",
                json!([{ "name": "http", "port": 8080 }]),
                json!([
                    { "addresses": ["10.244.1.5"], "conditions": { "ready": true } },
                    { "addresses": ["10.244.2.7"], "conditions": { "ready": false } },
                    { "addresses": ["10.244.3.9"] },
                ])
            ),
            slice("shop", "api", json!([{ "name": "http", "port": 8080 }]), json!([{ "addresses": ["10.244.4.1"] }])),
            slice("shop", "db", json!([{ "port": 5432 }]), json!([{ "addresses": ["10.244.1.6"] }])),
            json!({ "metadata": { "namespace": "shop", "name": "orphan" }, "ports": [{ "port": 1 }],
                    "endpoints": [{ "addresses": ["10.244.9.9"] }] }),
        ]);
        let (services, slices) = (services.as_array().unwrap(), slices.as_array().unwrap());
        let table = service_table(services, slices);
        let get = |a: &str| table.iter().find(|e| e.address == a).map(|e| e.endpoints.clone());
        assert_eq!(get("10.96.0.10:80").unwrap(), ["10.244.1.5:8080", "10.244.3.9:8080", "10.244.4.1:8080"]);
        assert_eq!(get("10.96.0.11:5432").unwrap(), ["10.244.1.6:5432"], "an unnamed port matches the unnamed one");
        assert_eq!(get("10.96.0.12:80").unwrap(), Vec::<String>::new(), "same name, other namespace: no endpoints");
        assert_eq!(table.len(), 3, "no UDP ports, headless or ExternalName Services: {table:?}");
        assert_eq!(service_table(services, slices), table, "deterministic");
    }

    #[test]
    fn objects_that_are_not_services_give_an_empty_table() {
        assert!(service_table(&[json!({"kind": "Status"})], &[json!(null)]).is_empty());
        let services = [svc("a", "b", json!({ "clusterIP": "not-an-ip", "ports": [{ "port": 80 }] }))];
        assert!(service_table(&services, &[]).is_empty());
    }
}
