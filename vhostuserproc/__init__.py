"""The vhost-user backend: libvhost-user, vhost-user-bridge's net device, its host side."""
