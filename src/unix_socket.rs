//! The gRPC service on a Unix domain socket (`--grpc-uds`, envoyproxy/ratelimit's
//! `GRPC_UDS`), for a sidecar whose Envoy shares a directory with meshlimit: no TCP port to
//! allocate or expose, and no TCP stack between the two.
//!
//! A socket file left by a process that died (a crash, SIGKILL) would make every restart
//! fail with "address in use"; one nobody answers on is removed before binding. One a live
//! server answers on is not touched: that is a second meshlimit started by mistake.

use std::io::ErrorKind;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};

use tokio::net::UnixListener;

/// The socket's mode: anyone who can reach its directory may connect. Envoy runs as
/// another user than meshlimit in most pods (Istio's proxy is uid 1337), and connecting
/// needs write permission on the socket; who may reach it is decided by the directory,
/// which for a sidecar is an `emptyDir` only the pod's containers mount.
const SOCKET_MODE: u32 = 0o666;

#[derive(Debug, thiserror::Error)]
pub enum UnixSocketError {
    #[error(
        "{path}: another server is listening on this socket; stop it, or give this one \
         another path with --grpc-uds (or GRPC_UDS)"
    )]
    InUse { path: String },
    #[error(
        "{path}: exists and is not a socket; remove it, or give another path with --grpc-uds \
         (or GRPC_UDS)"
    )]
    NotASocket { path: String },
    #[error(
        "cannot listen on {path} (gRPC): {source}; check that its directory exists and is \
         writable, or give another path with --grpc-uds (or GRPC_UDS)"
    )]
    Bind {
        path: String,
        source: std::io::Error,
    },
}

/// A bound socket, and its file, removed when this is dropped (the server stopped).
pub struct BoundSocket {
    listener: UnixListener,
    file: SocketFile,
}

impl BoundSocket {
    pub fn path(&self) -> &Path {
        &self.file.0
    }

    /// The listener, and what removes the file once dropped: kept by the caller until the
    /// server has stopped accepting.
    pub fn into_parts(self) -> (UnixListener, SocketFile) {
        (self.listener, self.file)
    }
}

/// Removes the socket file on drop.
pub struct SocketFile(PathBuf);

impl Drop for SocketFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Binds `path`, first removing a socket file nobody answers on.
pub fn bind(path: &Path) -> Result<BoundSocket, UnixSocketError> {
    let shown = path.display().to_string();
    if let Ok(metadata) = std::fs::symlink_metadata(path) {
        if !metadata.file_type().is_socket() {
            return Err(UnixSocketError::NotASocket { path: shown });
        }
        match std::os::unix::net::UnixStream::connect(path) {
            Ok(_) => return Err(UnixSocketError::InUse { path: shown }),
            // Refused: the socket's server is gone, the file is all that is left.
            Err(error) if error.kind() == ErrorKind::ConnectionRefused => {
                let _ = std::fs::remove_file(path);
            }
            // Anything else (no permission to connect, …) is left for bind to report.
            Err(_) => {}
        }
    }
    let bind_error = |source| UnixSocketError::Bind {
        path: shown.clone(),
        source,
    };
    let listener = UnixListener::bind(path).map_err(bind_error)?;
    let file = SocketFile(path.to_owned());
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(SOCKET_MODE))
        .map_err(bind_error)?;
    Ok(BoundSocket { listener, file })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_dead_servers_socket_is_replaced_and_a_live_ones_is_not() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("grpc.sock");

        // A socket file whose server is gone (bound, then closed without removing it).
        drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
        assert!(path.exists());
        let bound = bind(&path).expect("a dead server's socket is taken over");
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, SOCKET_MODE, "other users (Envoy's) may connect");

        let second = bind(&path).err().expect("the socket is in use");
        assert!(
            second.to_string().contains("another server is listening"),
            "{second}"
        );
        assert!(path.exists(), "the live server's socket is left alone");

        drop(bound);
        assert!(!path.exists(), "the file goes with the server");

        std::fs::write(&path, "not a socket").unwrap();
        let not_socket = bind(&path).err().expect("a regular file is not replaced");
        assert!(
            not_socket.to_string().contains("is not a socket"),
            "{not_socket}"
        );
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "not a socket");
    }
}
