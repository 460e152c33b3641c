//! What `bench_floor` and `bench_rawfloor` share: their command line, and mantlegate's threading (one
//! single-threaded runtime per core, all accepting from the one listening socket).

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpStream;

/// `NAME UPSTREAM_ADDR CALLER_KEY UPSTREAM_KEY PROJECT_ID [THREADS]`.
pub struct Args {
    pub upstream: SocketAddr,
    pub caller_key: String,
    pub upstream_key: String,
    pub project: String,
    /// One per CPU unless given, as `server.workers` defaults.
    pub threads: usize,
}

/// The command line of the example called `name`.
pub fn args(name: &str) -> anyhow::Result<Args> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [upstream, caller_key, upstream_key, project, rest @ ..] = args.as_slice() else {
        anyhow::bail!("usage: {name} UPSTREAM_ADDR CALLER_KEY UPSTREAM_KEY PROJECT_ID [THREADS]");
    };
    let threads = match rest.first() {
        Some(n) => n.parse()?,
        None => std::thread::available_parallelism()?.get(),
    };
    Ok(Args {
        upstream: upstream.parse()?,
        caller_key: caller_key.clone(),
        upstream_key: upstream_key.clone(),
        project: project.clone(),
        threads,
    })
}

/// Binds a loopback port, prints `listening on ADDR`, and serves every connection with `connection` on
/// `threads` threads until killed.
pub fn run<S, F, Fut>(threads: usize, state: Arc<S>, connection: F) -> anyhow::Result<()>
where
    S: Send + Sync + 'static,
    F: Fn(TcpStream, Arc<S>) -> Fut + Copy + Send + 'static,
    Fut: Future<Output = ()> + 'static,
{
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    listener.set_nonblocking(true)?;
    println!("listening on {}", listener.local_addr()?);
    let workers = (0..threads)
        .map(|_| {
            let (listener, state) = (listener.try_clone()?, state.clone());
            Ok(std::thread::spawn(move || serve(listener, state, connection)))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    for worker in workers {
        worker.join().map_err(|_| anyhow::anyhow!("a thread panicked"))??;
    }
    Ok(())
}

/// One thread: accepts connections and serves each as a task on this thread.
fn serve<S, F, Fut>(listener: std::net::TcpListener, state: Arc<S>, connection: F) -> anyhow::Result<()>
where
    F: Fn(TcpStream, Arc<S>) -> Fut,
    Fut: Future<Output = ()> + 'static,
{
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let tasks = tokio::task::LocalSet::new();
    tasks.block_on(&runtime, async move {
        let listener = tokio::net::TcpListener::from_std(listener)?;
        loop {
            let (tcp, _) = match listener.accept().await {
                Ok(accepted) => accepted,
                Err(e) => {
                    eprintln!("accept: {e}");
                    continue;
                }
            };
            let _ = tcp.set_nodelay(true);
            tokio::task::spawn_local(connection(tcp, state.clone()));
            // As mantlegate does: let the other threads take their share of connections arriving together.
            tokio::task::yield_now().await;
        }
    })
}
