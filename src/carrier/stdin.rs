//! The command's stdin: ours, copied into the carrier.
//!
//! QEMU gets one end of a socket pair as its own stdin and serves it to the guest as the
//! virtio-serial port `rrr.stdin`, which the init script gives the command as stdin; a thread
//! copies our stdin into the other end.
//!
//! End of input travels as a half-close. When our stdin ends, the thread shuts down the writing
//! half of the socket; QEMU reads end of file after the last byte and marks the port's host side
//! disconnected; Linux's virtio_console then returns 0 from a read of the port once the bytes
//! already queued have been read. Measured with QEMU 7.2: closing the socket instead loses
//! whatever the guest has not read yet, because QEMU drops the connection as soon as it sees the
//! hangup. So our end stays open, half-closed, until QEMU has exited ([`Input`]).

use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::process::Stdio;

use anyhow::{Context, Result};

/// Keeps our end of the stdin socket open; drop it only after QEMU has exited.
pub struct Input {
    _keep: UnixStream,
}

/// Starts copying our stdin into a new socket; returns QEMU's end (for its stdin) and the guard
/// of ours. The copying thread is detached: it may sit forever in a read of a terminal, which
/// must not hold up the end of the run.
pub fn forward() -> Result<(Stdio, Input)> {
    let (ours, theirs) =
        UnixStream::pair().context("cannot create the socket for the carrier's stdin")?;
    let keep = ours
        .try_clone()
        .context("cannot duplicate the carrier's stdin socket")?;
    if background_terminal() {
        // Reading it would stop this whole process (SIGTTIN), carrier and all.
        tracing::info!("stdin is the terminal of another (foreground) job; the command gets none");
        let _ = ours.shutdown(Shutdown::Write);
    } else {
        std::thread::Builder::new()
            .name("rrr-carrier-stdin".into())
            .spawn(move || copy(ours))
            .context("cannot start the thread that forwards stdin to the carrier")?;
    }
    Ok((Stdio::from(OwnedFd::from(theirs)), Input { _keep: keep }))
}

fn copy(mut sock: UnixStream) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match std::io::stdin().read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                if sock.write_all(&buf[..n]).is_err() {
                    // QEMU has exited: the command is over and wants no more.
                    return;
                }
            }
            Err(err) if err.kind() == std::io::ErrorKind::Interrupted => {}
            Err(err) => {
                tracing::debug!("reading stdin failed ({err}); the command sees end of file");
                break;
            }
        }
    }
    let _ = sock.shutdown(Shutdown::Write);
}

/// True when stdin is our controlling terminal but another process group owns it.
fn background_terminal() -> bool {
    use std::io::IsTerminal;
    if !std::io::stdin().is_terminal() {
        return false;
    }
    // SAFETY: both only query the process and the terminal.
    let (foreground, ours) = unsafe { (libc::tcgetpgrp(0), libc::getpgrp()) };
    foreground >= 0 && foreground != ours
}
