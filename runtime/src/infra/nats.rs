//! Local nats-server (see the module above).
