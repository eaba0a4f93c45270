//! Local etcd server (see the module above).
