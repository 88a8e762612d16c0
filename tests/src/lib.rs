//! Test support for failover: namespaces with guards, a kernel lab for
//! BPF_PROG_TEST_RUN, frame builders, and the inference test backend.

pub mod agentcli;
pub mod agentproc;
pub mod backend;
pub mod bench;
pub mod benchprog;
pub mod client;
pub mod configs;
pub mod flood;
pub mod generator;
pub mod inproc;
pub mod lab;
pub mod listener;
pub mod netns;
pub mod pacer;
pub mod packet;
pub mod peers;
pub mod program;
pub mod scratch;
pub mod topology;
pub mod traffic;
pub mod twoedge;
pub mod wait;
pub mod webagent;
pub mod xdp;
