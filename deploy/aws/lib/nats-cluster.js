// NATS JetStream on three EC2 instances, one an AZ, each with its own
// encrypted gp3 volume for the streams. Stream replicas 3: any one node (or
// AZ) can go and the other two keep quorum. An instance whose host fails is
// recovered in place (same id, address and volume) by a CloudWatch alarm.
// Names: nats-0..2.<zone> in a private hosted zone.
'use strict';

const { Aws, Duration, Tags } = require('aws-cdk-lib');
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

class NatsCluster extends Construct {
  /**
   * @param {Construct} scope
   * @param {string} id
   * @param {{vpc: ec2.IVpc, instanceType: string, volumeGiB: number, maxFileStore: string,
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

    const names = [...Array(NODES).keys()].map((i) => `nats-${i}.${ZONE}`);
    const subnets = vpc.selectSubnets({ subnetType: ec2.SubnetType.PRIVATE_WITH_EGRESS }).subnets;
    /** nats://nats-0.<zone>:4222,... for the service's backend.nats_url. */
    this.url = names.map((name) => `nats://${name}:${CLIENT_PORT}`).join(',');
    /** The nodes. */
    this.instances = names.map((name, i) => {
      const instance = new ec2.Instance(this, `Node${i}`, {
        vpc,
        vpcSubnets: { subnets: [subnets[i % subnets.length]] },
        instanceType: new ec2.InstanceType(props.instanceType),
        machineImage: ec2.MachineImage.latestAmazonLinux2023({ cpuType: ec2.AmazonLinuxCpuType.ARM_64 }),
        securityGroup: this.securityGroup,
        role,
        requireImdsv2: true,
        detailedMonitoring: true,
        ebsOptimized: true,
        blockDevices: [
          { deviceName: '/dev/xvda', volume: ec2.BlockDeviceVolume.ebs(20, { encrypted: true, volumeType: ec2.EbsDeviceVolumeType.GP3 }) },
          {
            deviceName: '/dev/sdf',
            volume: ec2.BlockDeviceVolume.ebs(props.volumeGiB, {
              encrypted: true,
              volumeType: ec2.EbsDeviceVolumeType.GP3,
              // The streams outlive the instance: a replaced node is re-seeded
              // by its peers, but a retained volume is the last resort.
              deleteOnTermination: false,
            }),
          },
        ],
        userData: ec2.UserData.custom(userData(name, names, props.maxFileStore, props.logGroup.logGroupName)),
        userDataCausesReplacement: true,
      });
      Tags.of(instance).add('Name', `eventflow-${name}`);
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
        reason: 'termination protection is left off so that a rolling replacement (new AMI, user data) is possible; the streams are replicated on three nodes and the data volume is retained',
      }]);
      return instance;
    });
  }

  /** Lets `peer` reach the nodes' client port. */
  allowClients(peer) {
    this.securityGroup.connections.allowFrom(peer, ec2.Port.tcp(CLIENT_PORT), 'NATS clients');
    this.securityGroup.connections.allowFrom(peer, ec2.Port.tcp(MONITOR_PORT), 'NATS monitoring (collector)');
  }
}

/** Boot script: format and mount the data volume once, run nats-server in a container. */
function userData(name, names, maxFileStore, logGroup) {
  const routes = names.map((peer) => `nats://${peer}:${ROUTE_PORT}`).join(', ');
  return `#!/bin/bash
set -euo pipefail
dnf install -y docker
systemctl enable --now docker
# The data volume (/dev/sdf, an NVMe device on Nitro): formatted only if empty.
device=$(readlink -f /dev/sdf)
if ! blkid "$device" >/dev/null 2>&1; then mkfs.xfs "$device"; fi
mkdir -p /data
grep -q ' /data ' /etc/fstab || echo "UUID=$(blkid -s UUID -o value "$device") /data xfs defaults,nofail 0 2" >> /etc/fstab
mount -a
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
docker run -d --name nats --restart always --network host --user 10001:10001 \\
  --read-only --cap-drop ALL --security-opt no-new-privileges \\
  --stop-timeout 60 \\
  --log-driver awslogs --log-opt awslogs-group=${logGroup} --log-opt awslogs-stream=${name} \\
  -v /data:/data -v /etc/nats:/etc/nats:ro \\
  ${NATS_IMAGE} --config /etc/nats/nats.conf
`;
}

module.exports = { NatsCluster, NATS_IMAGE };
