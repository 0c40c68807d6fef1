//! Generates the SPIFFE Workload API server from `proto/spiffe/workload/workload.proto` (protoc
//! is needed, as for etcd-client's build; `make deps` installs it), and compiles the east-west
//! gateway's XDP program `bpf/gateway_xdp.c` for the BPF target with clang (Debian's `clang`
//! and `libbpf-dev`, which `make deps` installs; `CLANG` names another clang).

use std::path::PathBuf;
use std::process::Command;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "proto/spiffe/workload/workload.proto";
    println!("cargo:rerun-if-changed={proto}");
    tonic_prost_build::configure()
        .build_client(false)
        .build_server(true)
        .compile_protos(&[proto], &["proto"])?;
    compile_xdp()
}

fn compile_xdp() -> Result<(), Box<dyn std::error::Error>> {
    let source = "bpf/gateway_xdp.c";
    println!("cargo:rerun-if-changed={source}");
    println!("cargo:rerun-if-env-changed=CLANG");
    let out = PathBuf::from(std::env::var("OUT_DIR")?).join("gateway_xdp.o");
    let clang = std::env::var("CLANG").unwrap_or_else(|_| "clang".into());
    // <linux/types.h> includes <asm/types.h>, which Debian keeps under the host's multiarch
    // folder; the BPF target has none of its own.
    let arch = std::env::var("CARGO_CFG_TARGET_ARCH")?;
    let multiarch = match arch.as_str() {
        "x86_64" => "x86_64-linux-gnu",
        "aarch64" => "aarch64-linux-gnu",
        "riscv64" => "riscv64-linux-gnu",
        other => {
            return Err(
                format!("the XDP program's headers: no multiarch folder known for {other}").into(),
            )
        }
    };
    let status = Command::new(&clang)
        .args(["-O2", "-g", "-Wall", "-Werror", "-target", "bpf"])
        .arg(format!("-I/usr/include/{multiarch}"))
        .arg("-c")
        .arg(source)
        .arg("-o")
        .arg(&out)
        .status()
        .map_err(|e| {
            format!("cannot run {clang:?} to compile {source} ({e}); install Debian's clang and libbpf-dev (`make deps`)")
        })?;
    if !status.success() {
        return Err(format!(
            "{clang} could not compile {source} ({status}); it needs Debian's libbpf-dev (`make deps`)"
        )
        .into());
    }
    Ok(())
}
