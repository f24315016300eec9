//! The byte stream to gdb. Run directly, rrr listens on the loopback address itself. Inside the
//! carrier (which has no network, only virtio-serial ports), QEMU listens on the host's address
//! and hands the bytes to a virtio-serial port named [`CARRIER_PORT`]; the rrr inside reads and
//! writes that port's device, and gdb on the host never knows the difference.

use std::fs::File;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsFd, AsRawFd};
use std::path::PathBuf;

use anyhow::{bail, Context, Result};

/// The virtio-serial port that carries gdb's connection into the carrier.
pub const CARRIER_PORT: &str = "rrr.gdb";

/// Where gdb's bytes come from, before it has connected.
pub enum Endpoint {
    Tcp(TcpListener),
    /// A virtio-serial port's device inside the carrier.
    Port(PathBuf),
}

impl Endpoint {
    /// Listens on `addr` (checked to be a loopback address by the caller).
    pub fn listen(addr: SocketAddr) -> Result<Endpoint> {
        let listener =
            TcpListener::bind(addr).with_context(|| {
                if crate::carrier::inside_carrier() {
                    format!("cannot listen for gdb on {addr}: the carrier has no TCP/IP; run `rrr replay --gdb` outside it (QEMU then carries gdb's connection in)")
                } else {
                    format!("cannot listen for gdb on {addr}")
                }
            })?;
        Ok(Endpoint::Tcp(listener))
    }

    /// The device of the carrier's gdb port (`/sys/class/virtio-ports/*/name`).
    pub fn carrier_port() -> Result<Endpoint> {
        for entry in std::fs::read_dir("/sys/class/virtio-ports")
            .context("no virtio ports: is this the carrier?")?
        {
            let entry = entry?;
            let name = std::fs::read_to_string(entry.path().join("name")).unwrap_or_default();
            if name.trim() == CARRIER_PORT {
                return Ok(Endpoint::Port(
                    PathBuf::from("/dev").join(entry.file_name()),
                ));
            }
        }
        bail!("the carrier has no virtio port {CARRIER_PORT} for gdb");
    }

    /// Waits for gdb.
    pub fn accept(&self) -> Result<Conn> {
        match self {
            Endpoint::Tcp(listener) => loop {
                match listener.accept() {
                    Ok((stream, _)) => {
                        stream.set_nodelay(true)?;
                        return Ok(Conn::Tcp(stream));
                    }
                    // The watchdog's kicks (signals) interrupt the wait.
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(e).context("waiting for gdb failed"),
                }
            },
            Endpoint::Port(path) => {
                let file = std::fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open(path)
                    .with_context(|| format!("cannot open {}", path.display()))?;
                // Until a client connects to QEMU's listener on the host, the port polls as hung
                // up and reads as at its end.
                let conn = Conn::Port(file);
                while conn.poll(0) & libc::POLLHUP != 0 {
                    std::thread::sleep(std::time::Duration::from_millis(50));
                }
                Ok(conn)
            }
        }
    }
}

pub enum Conn {
    Tcp(TcpStream),
    Port(File),
}

impl Conn {
    /// Blocks for at least one byte; 0 means gdb went away.
    pub fn read_some(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        loop {
            let got = match self {
                Conn::Tcp(s) => s.read(buf),
                Conn::Port(f) => f.read(buf),
            };
            match got {
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                other => return other,
            }
        }
    }

    /// Whether gdb has sent something (a Ctrl-C) that has not been read, without blocking.
    /// (A port whose client went away reads as readable: the read then says so.)
    pub fn readable(&self) -> bool {
        self.poll(0) & libc::POLLIN != 0
    }

    /// The poll events of the connection, waiting at most `ms` milliseconds for one.
    fn poll(&self, ms: i32) -> libc::c_short {
        let fd = match self {
            Conn::Tcp(s) => s.as_fd().as_raw_fd(),
            Conn::Port(f) => f.as_fd().as_raw_fd(),
        };
        let mut pfd = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd. An interrupted poll (the watchdog's kicks) reads as nothing.
        let n = unsafe { libc::poll(&mut pfd, 1, ms) };
        if n > 0 {
            pfd.revents
        } else {
            0
        }
    }

    fn writer(&mut self) -> &mut dyn Write {
        match self {
            Conn::Tcp(s) => s,
            Conn::Port(f) => f,
        }
    }
}

impl gdbstub::conn::Connection for Conn {
    type Error = std::io::Error;

    fn write(&mut self, byte: u8) -> std::io::Result<()> {
        self.writer().write_all(&[byte])
    }

    fn write_all(&mut self, buf: &[u8]) -> std::io::Result<()> {
        self.writer().write_all(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.writer().flush()
    }
}
