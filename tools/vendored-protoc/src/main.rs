//! Runs the protoc binary vendored by the `protoc-bin-vendored` crate with this program's
//! arguments, and exits with its status (tools/run-protoc calls it when no protoc is installed).

use std::process::{Command, ExitCode};

fn main() -> ExitCode {
    let protoc = match protoc_bin_vendored::protoc_bin_path() {
        Ok(path) => path,
        Err(e) => {
            eprintln!("vendored protoc: {e}; install protoc (protobuf-compiler) or set PROTOC");
            return ExitCode::FAILURE;
        }
    };
    match Command::new(&protoc)
        .args(std::env::args_os().skip(1))
        .status()
    {
        Ok(status) => match status.code() {
            Some(code) => ExitCode::from(u8::try_from(code).unwrap_or(1)),
            None => ExitCode::FAILURE,
        },
        Err(e) => {
            eprintln!("vendored protoc: cannot run {}: {e}", protoc.display());
            ExitCode::FAILURE
        }
    }
}
