// NATS JetStream on three EC2 instances, one an AZ, each with its own
// encrypted gp3 volume for the streams. Stream replicas 3: any one node (or
// AZ) can go and the other two keep quorum. An instance whose host fails is
// recovered in place (same id, address and volume) by a CloudWatch alarm.
// Names: nats-0..2.<zone> in a private hosted zone.
//
// The streams outlive every change: the data volume is a resource of its
// own (retained, attached to the node), the AMI is a parameter (an AMI
// release does not replace the nodes), and the boot script runs at every
// boot, so a new tier (instance type, volume size, max_file_store) is
// applied by a stop and start, one node after another.
'use strict';

const { Aws, Duration, RemovalPolicy, Tags } = require('aws-cdk-lib');
const cloudwatch = require('aws-cdk-lib/aws-cloudwatch');
const ec2 = require('aws-cdk-lib/aws-ec2');
const iam = require('aws-cdk-lib/aws-iam');
const route53 = require('aws-cdk-lib/aws-route53');
const { Construct } = require('constructs');
const { nag } = require('./suppress');

/** The nats-server release the project's tests run. */
const NATS_IMAGE = 'nats:2.15.1-alpine';
const NODES = 3;
const ZONE = 'eventflow.internal';
const CLIENT_PORT = 4222;
const ROUTE_PORT = 6222;
const MONITOR_PORT = 8222;
const DATA_DEVICE = '/dev/sdf';

class NatsCluster extends Construct {
  /**
   * @param {Construct} scope
   * @param {string} id
   * @param {{vpc: ec2.IVpc, imageId: string, instanceType: string, volumeGiB: number, maxFileStore: string,
   *          logGroup: import('aws-cdk-lib/aws-logs').ILogGroup}} props
   */
  constructor(scope, id, props) {
    super(scope, id);
    const { vpc } = props;
    /** Admits clients on 4222 from whoever is allowed (the service). */
    this.securityGroup = new ec2.SecurityGroup(this, 'SecurityGroup', {
      vpc,
      description: 'NATS nodes: clients from the eventflow tasks, routes between the nodes',
      allowAllOutbound: true,
    });
    this.securityGroup.addIngressRule(this.securityGroup, ec2.Port.tcp(ROUTE_PORT), 'cluster routes between the nodes');

    const zone = new route53.PrivateHostedZone(this, 'Zone', { zoneName: ZONE, vpc });
    const role = new iam.Role(this, 'Role', {
      assumedBy: new iam.ServicePrincipal('ec2.amazonaws.com'),
      description: 'NATS nodes: SSM sessions (no SSH) and their container logs',
      managedPolicies: [iam.ManagedPolicy.fromAwsManagedPolicyName('AmazonSSMManagedInstanceCore')],
    });
    props.logGroup.grantWrite(role);
    nag(role, [{
      id: 'AwsSolutions::AwsSolutions-IAM4[Policy::arn:<AWS::Partition>:iam::aws:policy/AmazonSSMManagedInstanceCore]',
      reason: 'AmazonSSMManagedInstanceCore is the documented minimum for Session Manager, which replaces SSH',
    }]);

    // An AMI pinned by the operator: a new release changes nothing until
    // the parameter does (then the nodes are replaced, the volumes kept).
    const machineImage = {
      getImage: () => ({ imageId: props.imageId, osType: ec2.OperatingSystemType.LINUX, userData: ec2.UserData.forLinux() }),
    };
    const names = [...Array(NODES).keys()].map((i) => `nats-${i}.${ZONE}`);
    const subnets = vpc.selectSubnets({ subnetType: ec2.SubnetType.PRIVATE_WITH_EGRESS }).subnets;
    /** nats://nats-0.<zone>:4222,... for the service's backend.nats_url. */
    this.url = names.map((name) => `nats://${name}:${CLIENT_PORT}`).join(',');
    /** The nodes. */
    this.instances = [];
    names.forEach((name, i) => {
      const subnet = subnets[i % subnets.length];
      const instance = new ec2.Instance(this, `Node${i}`, {
        vpc,
        vpcSubnets: { subnets: [subnet] },
        instanceType: new ec2.InstanceType(props.instanceType),
        machineImage,
        securityGroup: this.securityGroup,
        role,
        requireImdsv2: true,
        detailedMonitoring: true,
        ebsOptimized: true,
        blockDevices: [{
          deviceName: '/dev/xvda',
          volume: ec2.BlockDeviceVolume.ebs(20, { encrypted: true, volumeType: ec2.EbsDeviceVolumeType.GP3 }),
        }],
        userData: bootScript(name, names, props.maxFileStore, props.logGroup.logGroupName),
      });
      Tags.of(instance).add('Name', `eventflow-${name}`);
      // One node at a time when a change stops and starts them.
      if (i > 0) instance.node.addDependency(this.instances[i - 1]);
      this.instances.push(instance);

      // A volume of its own (the L1 resource), retained and attached at
      // boot, so that a replaced node finds its streams.
      const data = new ec2.CfnVolume(this, `Data${i}`, {
        availabilityZone: subnet.availabilityZone,
        size: props.volumeGiB,
        volumeType: 'gp3',
        encrypted: true,
        tags: [{ key: 'Name', value: `eventflow-${name}-data` }],
      });
      data.applyRemovalPolicy(RemovalPolicy.RETAIN);
      new ec2.CfnVolumeAttachment(this, `Attach${i}`, {
        instanceId: instance.instanceId,
        volumeId: data.ref,
        device: DATA_DEVICE,
      });

      new route53.ARecord(this, `Name${i}`, {
        zone,
        recordName: `nats-${i}`,
        target: route53.RecordTarget.fromIpAddresses(instance.instancePrivateIp),
        ttl: Duration.seconds(60),
      });
      // A failed host: recover onto a new one with the same volume and address.
      new cloudwatch.Alarm(this, `Recover${i}`, {
        alarmDescription: `recover ${name} when its host fails`,
        metric: new cloudwatch.Metric({
          namespace: 'AWS/EC2',
          metricName: 'StatusCheckFailed_System',
          dimensionsMap: { InstanceId: instance.instanceId },
          statistic: 'Maximum',
          period: Duration.minutes(1),
        }),
        threshold: 1,
        evaluationPeriods: 2,
        comparisonOperator: cloudwatch.ComparisonOperator.GREATER_THAN_OR_EQUAL_TO_THRESHOLD,
      }).addAlarmAction({ bind: () => ({ alarmActionArn: `arn:${Aws.PARTITION}:automate:${Aws.REGION}:ec2:recover` }) });
      nag(instance, [{
        id: 'AwsSolutions::AwsSolutions-EC29',
        reason: 'termination protection is left off so that a new AMI can replace a node; the streams are on three nodes and on retained volumes of their own',
      }, {
        id: 'CloudFormation-Validate::W9010',
        reason: 'the AMI is pinned per deployment and region by the natsImageId context value (docs/aws.md), so that an AMI release never replaces a node unasked',
      }]);
    });
  }

  /** Lets `peer` reach the nodes' client port. */
  allowClients(peer) {
    this.securityGroup.connections.allowFrom(peer, ec2.Port.tcp(CLIENT_PORT), 'NATS clients');
  }
}

/**
 * The node's boot script. cloud-init runs it at every boot (not only the
 * first), so a changed configuration takes effect at the next start: it
 * waits for the data volume, formats it only if empty, grows the file
 * system to the volume, and (re)starts nats-server in a container.
 */
function bootScript(name, names, maxFileStore, logGroup) {
  const routes = names.map((peer) => `nats://${peer}:${ROUTE_PORT}`).join(', ');
  const everyBoot = ['#cloud-config', 'cloud_final_modules:', '  - [scripts-user, always]', ''].join('\n');
  const script = `#!/bin/bash
set -euo pipefail
command -v docker >/dev/null || dnf install -y docker
systemctl enable --now docker
# The data volume (${DATA_DEVICE}, an NVMe device on Nitro) is attached
# after the instance starts.
for _ in $(seq 120); do [ -e ${DATA_DEVICE} ] && break; sleep 2; done
device=$(readlink -f ${DATA_DEVICE})
if ! blkid "$device" >/dev/null 2>&1; then mkfs.xfs "$device"; fi
mkdir -p /data
grep -q ' /data ' /etc/fstab || echo "UUID=$(blkid -s UUID -o value "$device") /data xfs defaults,nofail 0 2" >> /etc/fstab
mount -a
xfs_growfs /data
chown 10001:10001 /data
mkdir -p /etc/nats
cat > /etc/nats/nats.conf <<'CONF'
server_name: ${name}
lame_duck_grace_period: 10s
lame_duck_duration: 30s
port: ${CLIENT_PORT}
http_port: ${MONITOR_PORT}
cluster {
  name: eventflow
  port: ${ROUTE_PORT}
  routes: [ ${routes} ]
}
jetstream {
  store_dir: /data
  max_file_store: ${maxFileStore}
  max_memory_store: 0
}
CONF
docker rm -f nats >/dev/null 2>&1 || true
# SIGUSR2 puts nats-server in lame-duck mode: clients move to the other
# nodes before it stops (lame_duck_duration 30 s, inside the 60 s timeout).
docker run -d --name nats --restart always --network host --user 10001:10001 \\
  --read-only --cap-drop ALL --security-opt no-new-privileges \\
  --stop-signal SIGUSR2 --stop-timeout 60 \\
  --log-driver awslogs --log-opt awslogs-group=${logGroup} --log-opt awslogs-stream=${name} \\
  -v /data:/data -v /etc/nats:/etc/nats:ro \\
  ${NATS_IMAGE} --config /etc/nats/nats.conf
`;
  const userData = new ec2.MultipartUserData();
  userData.addPart(ec2.MultipartBody.fromRawBody({ contentType: 'text/cloud-config; charset="utf-8"', body: everyBoot }));
  userData.addPart(ec2.MultipartBody.fromRawBody({ contentType: ec2.MultipartBody.SHELL_SCRIPT, body: script }));
  return userData;
}

module.exports = { NatsCluster, NATS_IMAGE };
