//! Every YAML and TOML file in deploy/ is read with the project's own validators: registry
//! objects with `parse_documents` (what `halyard ctl apply` runs), sidecar configs with
//! `Config::parse` (what `halyard sidecar` runs), wherever they appear: plain files, Kubernetes
//! ConfigMaps, the compose file's mounts.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};

use halyard_registry::model::parse_documents;
use halyard_sidecar::ca::server::CaServerConfig;
use halyard_sidecar::config::Config;
use halyard_sidecar::gateway::GatewayConfig;
use serde_yaml::Value;

/// Values filled in when the file is deployed (the Kubernetes sidecar's start command puts the pod
/// IP in place of `${POD_IP}`), replaced by a documentation address before validation.
const PLACEHOLDERS: [(&str, &str); 1] = [("${POD_IP}", "192.0.2.10")];

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

fn files(ext: &[&str]) -> Vec<PathBuf> {
    fn walk(dir: &Path, ext: &[&str], out: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(&path, ext, out);
            } else if path
                .extension()
                .is_some_and(|e| ext.iter().any(|x| e == *x))
            {
                out.push(path);
            }
        }
    }
    let mut out = Vec::new();
    walk(&deploy_dir(), ext, &mut out);
    out.sort();
    out
}

fn yaml_docs(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap();
    serde_yaml::Deserializer::from_str(&text)
        .map(|d| {
            <Value as serde::Deserialize>::deserialize(d)
                .unwrap_or_else(|e| panic!("{}: not YAML: {e}", path.display()))
        })
        .filter(|v| !v.is_null())
        .collect()
}

/// A sidecar config, which must enroll with the mesh CA: no workload key is made anywhere but
/// beside its sidecar.
fn sidecar_config(text: &str, origin: &Path) -> Config {
    let mut text = text.to_owned();
    for (from, to) in PLACEHOLDERS {
        text = text.replace(from, to);
    }
    let config = Config::parse(&text, origin).unwrap_or_else(|e| panic!("{e}"));
    let identity = &config.file.identity;
    assert!(
        identity.ca.is_some() && identity.token.is_some() && identity.ca_root.is_some(),
        "{}: identity by enrollment (ca, token, ca_root)",
        origin.display()
    );
    config
}

/// `ca.toml`: a CA server config (`halyard ca serve`); `gateway.toml`: an east-west gateway's
/// (`halyard gateway`); else a sidecar config.
fn any_config(text: &str, origin: &Path) -> Option<Config> {
    if origin.file_name().is_some_and(|n| n == "gateway.toml") {
        let gw = GatewayConfig::parse(text, origin).unwrap_or_else(|e| panic!("{e}"));
        assert!(gw.registry.starts_with("etcd://"), "{}", origin.display());
        return None;
    }
    if origin.file_name().is_some_and(|n| n == "ca.toml") {
        let ca = CaServerConfig::parse(text, origin).unwrap_or_else(|e| panic!("{e}"));
        assert!(ca.registry.starts_with("etcd://"), "{}", origin.display());
        return None;
    }
    Some(sidecar_config(text, origin))
}

fn registry_objects(text: &str, origin: &str) -> usize {
    match parse_documents(origin, text) {
        Ok(objects) => objects.len(),
        Err(errs) => panic!(
            "{}",
            errs.iter().map(|e| format!("{e}\n")).collect::<String>()
        ),
    }
}

fn str_at<'a>(v: &'a Value, path: &[&str]) -> Option<&'a str> {
    let mut v = v;
    for p in path {
        v = v.get(*p)?;
    }
    v.as_str()
}

/// A ConfigMap's files: `*.toml` are sidecar configs, `*.yaml` registry objects.
fn check_config_map(doc: &Value, origin: &Path) -> (usize, usize) {
    let (mut configs, mut objects) = (0, 0);
    let Some(data) = doc.get("data").and_then(Value::as_mapping) else {
        return (0, 0);
    };
    for (key, value) in data {
        let (key, text) = (key.as_str().unwrap(), value.as_str().unwrap());
        let label = origin.join(key);
        if key.ends_with(".toml") {
            configs += usize::from(any_config(text, &label).is_some());
        } else if key.ends_with(".yaml") {
            objects += registry_objects(text, &label.display().to_string());
        }
    }
    (configs, objects)
}

/// No deploy file makes a workload key centrally (`halyard ca issue`): sidecars enroll.
#[test]
fn no_deploy_file_issues_workload_keys_centrally() {
    for path in files(&["yaml", "yml", "toml", "sh", "service"]) {
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(!text.contains("ca issue"), "{}", path.display());
    }
}

/// Every YAML file parses, and every mesh object and sidecar config in it is valid.
#[test]
fn every_deploy_yaml_file_is_valid() {
    let (mut configs, mut objects, mut k8s) = (0, 0, 0);
    for path in files(&["yaml", "yml"]) {
        let docs = yaml_docs(&path);
        assert!(!docs.is_empty(), "{}: empty", path.display());
        let is_k8s = docs.iter().all(|d| d.get("apiVersion").is_some());
        let is_compose = docs.len() == 1 && docs[0].get("services").is_some();
        if is_k8s {
            for d in &docs {
                k8s += 1;
                if str_at(d, &["kind"]) == Some("ConfigMap") {
                    let (c, o) = check_config_map(d, &path);
                    configs += c;
                    objects += o;
                }
            }
        } else if is_compose {
            check_compose(&path, &docs[0]);
        } else {
            let text = std::fs::read_to_string(&path).unwrap();
            let n = registry_objects(&text, &path.display().to_string());
            assert_eq!(n, docs.len(), "{}", path.display());
            objects += n;
        }
    }
    assert!(configs >= 6, "sidecar configs in ConfigMaps: {configs}");
    assert!(objects >= 12, "registry objects: {objects}");
    assert!(k8s >= 20, "kubernetes objects: {k8s}");
}

#[test]
fn every_toml_file_is_a_valid_sidecar_config() {
    let tomls = files(&["toml"]);
    assert!(tomls.len() >= 7, "{tomls:?}");
    for path in tomls {
        let text = std::fs::read_to_string(&path).unwrap();
        let Some(config) = any_config(&text, &path) else {
            continue;
        };
        assert!(
            config.file.registry.starts_with("etcd://"),
            "{}",
            path.display()
        );
    }
}

/// Each app container shares the network namespace of a sidecar container whose config exists.
fn check_compose(path: &Path, doc: &Value) {
    let services = doc.get("services").and_then(Value::as_mapping).unwrap();
    let dir = path.parent().unwrap();
    let (mut sidecars, mut gateways) = (0, 0);
    for (name, svc) in services {
        let name = name.as_str().unwrap();
        let command: Vec<&str> = svc
            .get("command")
            .and_then(Value::as_sequence)
            .map(|s| s.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        if command.first() == Some(&"sidecar") {
            let config = dir
                .join("config")
                .join(format!("{}.toml", name.strip_suffix("-sidecar").unwrap()));
            let text = std::fs::read_to_string(&config)
                .unwrap_or_else(|e| panic!("{}: {e}", config.display()));
            sidecar_config(&text, &config);
            sidecars += 1;
        }
        if command.starts_with(&["gateway", "--config"]) {
            let config = dir.join("config").join("gateway.toml");
            let text = std::fs::read_to_string(&config).unwrap();
            assert!(any_config(&text, &config).is_none());
            gateways += 1;
        }
        if command.starts_with(&["ca", "serve"]) {
            let config = dir.join("config").join("ca.toml");
            let text = std::fs::read_to_string(&config).unwrap();
            assert!(any_config(&text, &config).is_none());
        }
        if command.first() == Some(&"sample-app") {
            let mode = str_at(svc, &["network_mode"]).unwrap();
            assert_eq!(mode, format!("service:{name}-sidecar"), "{name}");
        }
    }
    assert!(sidecars >= 6, "{}: {sidecars} sidecars", path.display());
    assert_eq!(gateways, 1, "{}: the east-west gateway", path.display());
}

/// The pod specs of the six Deployments of the Kubernetes bookinfo.
fn bookinfo_pod_specs() -> Vec<Value> {
    let path = deploy_dir().join("kubernetes/40-bookinfo.yaml");
    let docs = yaml_docs(&path);
    let deployments: Vec<&Value> = docs
        .iter()
        .filter(|d| str_at(d, &["kind"]) == Some("Deployment"))
        .collect();
    assert_eq!(deployments.len(), 6);
    deployments
        .into_iter()
        .map(|d| {
            d.get("spec")
                .unwrap()
                .get("template")
                .unwrap()
                .get("spec")
                .unwrap()
                .clone()
        })
        .collect()
}

#[test]
fn every_deployment_captures_its_traffic_with_an_init_container() {
    for spec in bookinfo_pod_specs() {
        let init = format!("{:?}", spec.get("initContainers").unwrap());
        assert!(
            init.contains("iptables") && init.contains("install"),
            "{init}"
        );
    }
}

#[test]
fn every_deployment_runs_a_sidecar_beside_its_app() {
    for spec in bookinfo_pod_specs() {
        let containers = format!("{:?}", spec.get("containers").unwrap());
        assert!(
            containers.contains("halyard sidecar --config"),
            "{containers}"
        );
        assert!(containers.contains("sample-app"), "{containers}");
    }
}
