//! A small blocking QMP client: commands, their replies, and the events that arrive meanwhile.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

/// Why a QMP exchange failed.
#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    /// The socket failed.
    #[error("QMP socket {what}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The system error.
        #[source]
        source: std::io::Error,
    },
    /// QEMU sent something that is not QMP.
    #[error("QMP protocol error: {0}")]
    Protocol(String),
    /// QEMU refused the command.
    #[error("QEMU refused {command}: {class}: {desc}")]
    Command {
        /// The command.
        command: String,
        /// QEMU's error class.
        class: String,
        /// QEMU's description.
        desc: String,
    },
    /// Nothing came in time.
    #[error("timed out after {0:?} waiting for {1}")]
    Timeout(Duration, String),
}

/// A QMP connection, capabilities negotiated.
#[derive(Debug)]
pub struct Qmp {
    writer: UnixStream,
    reader: BufReader<UnixStream>,
    /// Events received while waiting for replies, oldest first.
    events: Vec<Value>,
}

impl Qmp {
    /// Connects to a QMP socket, retrying until `timeout` while QEMU starts.
    pub fn connect(path: &Path, timeout: Duration) -> Result<Self, QmpError> {
        let deadline = Instant::now() + timeout;
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(source) => {
                    return Err(QmpError::Io {
                        what: "connect",
                        source,
                    });
                }
            }
        };
        stream
            .set_read_timeout(Some(timeout))
            .map_err(|source| QmpError::Io {
                what: "setup",
                source,
            })?;
        let reader = BufReader::new(stream.try_clone().map_err(|source| QmpError::Io {
            what: "setup",
            source,
        })?);
        let mut qmp = Qmp {
            writer: stream,
            reader,
            events: Vec::new(),
        };
        // QEMU can emit an event before the greeting (a destination started with
        // `-incoming exec:...` begins loading at once): such events are kept for `wait_event`
        // like any other.
        loop {
            let message = qmp.read()?;
            if message.get("QMP").is_some() {
                break;
            }
            if message.get("event").is_none() {
                return Err(QmpError::Protocol(format!("no greeting: {message}")));
            }
            qmp.events.push(message);
        }
        qmp.execute("qmp_capabilities", json!({}))?;
        Ok(qmp)
    }

    fn read(&mut self) -> Result<Value, QmpError> {
        let mut line = String::new();
        let n = self
            .reader
            .read_line(&mut line)
            .map_err(|source| QmpError::Io {
                what: "read",
                source,
            })?;
        if n == 0 {
            return Err(QmpError::Io {
                what: "read",
                source: std::io::ErrorKind::UnexpectedEof.into(),
            });
        }
        serde_json::from_str(&line).map_err(|e| QmpError::Protocol(format!("{e}: {line}")))
    }

    /// Runs `command` with `arguments`; returns its `return` value.
    pub fn execute(&mut self, command: &str, arguments: Value) -> Result<Value, QmpError> {
        let request = json!({ "execute": command, "arguments": arguments });
        let mut text = request.to_string();
        text.push('\n');
        self.writer
            .write_all(text.as_bytes())
            .map_err(|source| QmpError::Io {
                what: "write",
                source,
            })?;
        loop {
            let reply = self.read()?;
            if reply.get("event").is_some() {
                self.events.push(reply);
                continue;
            }
            if let Some(ret) = reply.get("return") {
                return Ok(ret.clone());
            }
            if let Some(err) = reply.get("error") {
                return Err(QmpError::Command {
                    command: command.to_string(),
                    class: err["class"].as_str().unwrap_or("").to_string(),
                    desc: err["desc"].as_str().unwrap_or("").to_string(),
                });
            }
            return Err(QmpError::Protocol(format!("unexpected reply: {reply}")));
        }
    }

    /// Waits until an event named `name` arrives (or has arrived); returns it.
    pub fn wait_event(&mut self, name: &str, timeout: Duration) -> Result<Value, QmpError> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(i) = self.events.iter().position(|e| e["event"] == name) {
                return Ok(self.events.remove(i));
            }
            if Instant::now() >= deadline {
                return Err(QmpError::Timeout(timeout, format!("event {name}")));
            }
            // Poll with a cheap command so that events flow in without a dedicated reader.
            std::thread::sleep(Duration::from_millis(20));
            self.execute("query-status", json!({}))?;
        }
    }

    /// Every event received so far that is named `name`.
    pub fn events_named(&self, name: &str) -> Vec<Value> {
        self.events
            .iter()
            .filter(|e| e["event"] == name)
            .cloned()
            .collect()
    }
}

/// The timestamp of a QMP event, in seconds.
pub fn event_time(event: &Value) -> Option<f64> {
    let ts = event.get("timestamp")?;
    Some(ts["seconds"].as_f64()? + ts["microseconds"].as_f64()? / 1e6)
}

#[cfg(test)]
mod tests {
    use std::io::{BufRead, Write};
    use std::os::unix::net::UnixListener;

    use super::*;

    /// A QMP server that sends `before` ahead of its greeting, then answers every command.
    fn fake_qemu(path: &Path, before: &'static str) -> std::thread::JoinHandle<()> {
        let listener = UnixListener::bind(path).unwrap();
        std::thread::spawn(move || {
            let (mut stream, _) = listener.accept().unwrap();
            // A client that refuses what it reads hangs up: writes may fail from then on.
            let _ = stream.write_all(before.as_bytes());
            let _ = stream.write_all(b"{\"QMP\": {\"version\": {}, \"capabilities\": []}}\n");
            let mut reader = std::io::BufReader::new(stream.try_clone().unwrap());
            let mut line = String::new();
            while reader.read_line(&mut line).is_ok_and(|n| n > 0) {
                let _ = stream.write_all(b"{\"return\": {}}\n");
                line.clear();
            }
        })
    }

    #[test]
    fn an_event_before_the_greeting_is_kept() {
        let dir = std::env::temp_dir().join(format!("ps-qmp-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("early-event.qmp");
        let _ = std::fs::remove_file(&path);
        let server = fake_qemu(
            &path,
            "{\"event\": \"MIGRATION\", \"data\": {\"status\": \"setup\"}}\n",
        );
        let qmp = Qmp::connect(&path, Duration::from_secs(5)).unwrap();
        assert_eq!(qmp.events_named("MIGRATION").len(), 1);
        drop(qmp);
        server.join().unwrap();

        // Anything else before the greeting is still refused.
        let _ = std::fs::remove_file(&path);
        let server = fake_qemu(&path, "{\"return\": {}}\n");
        let err = Qmp::connect(&path, Duration::from_secs(5)).unwrap_err();
        assert!(err.to_string().contains("no greeting"), "{err}");
        server.join().unwrap();
        std::fs::remove_dir_all(&dir).ok();
    }
}
