//! Generates the SPIFFE Workload API server from `proto/spiffe/workload/workload.proto` (protoc
//! is needed, as for etcd-client's build; `make deps` installs it).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "proto/spiffe/workload/workload.proto";
    println!("cargo:rerun-if-changed={proto}");
    tonic_prost_build::configure()
        .build_client(false)
        .build_server(true)
        .compile_protos(&[proto], &["proto"])?;
    Ok(())
}
